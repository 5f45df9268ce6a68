"""``opendps hub ...`` (az iot hub's verbs) against a real ``opendps serve``, on SQLite and PostgreSQL.

Devices are real paho-mqtt clients (tests/test_mqtt_hub.py's helper) authenticating with the SAS keys the
CLI created, so telemetry, direct methods, desired pushes and C2D go end to end. Every refusal must be one
``error:`` line on stderr and a non-zero exit.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
from tests.conftest import _run_server, database
from tests.test_api import _assert_error
from tests.test_device_api import svc
from tests.test_mqtt_hub import HUB, hub_username
from tests.test_mqtt_hub import Client as Device

from opendps.transport import sas

SERVER_STORES = ("sqlite",)  # the CLI/SDK/front end is the subject, not the store (tests/conftest.py)

pytestmark = pytest.mark.timeout(300, func_only=True)
THUMBPRINT = "0123456789abcdef0123456789abcdef01234567"


def ok(proc: subprocess.CompletedProcess) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The single ``error:`` line of a failed command; it must contain ``words``."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def sas_device(server, device_id: str) -> str:
    """Create a SAS device with server-generated keys; return its primary key."""
    created = ok(server.cli("hub", "device-identity", "create", "--device-id", device_id))
    return created["authentication"]["symmetricKey"]["primaryKey"]


def connect(server, device_id: str, key: str, *topics: str) -> Device:
    d = Device(server, device_id, hub_username(device_id), password=sas.generate(f"{HUB}/devices/{device_id}", key))
    assert d.rc == 0
    if topics:
        d.subscribe(*topics)
    return d


def wait_connection_state(server, device_id: str, state: str) -> None:
    deadline = time.time() + 10
    while time.time() < deadline:
        if ok(server.cli("hub", "device-identity", "show", "-d", device_id))["connectionState"] == state:
            return
        time.sleep(0.1)
    pytest.fail(f"{device_id} did not become {state}")


def test_device_identity_verbs(server):
    created = ok(server.cli("hub", "device-identity", "create", "--device-id", "cli-id-sas"))
    keys = created["authentication"]["symmetricKey"]
    assert (created["deviceId"], created["status"], created["authentication"]["type"]) == ("cli-id-sas", "enabled", "sas")
    assert len(keys["primaryKey"]) == 44 and len(keys["secondaryKey"]) == 44 and keys["primaryKey"] != keys["secondaryKey"]
    shown = ok(server.cli("hub", "device-identity", "show", "-d", "cli-id-sas"))
    assert shown["authentication"]["symmetricKey"] == keys and shown["connectionState"] == "Disconnected"

    thumb = ok(server.cli("hub", "device-identity", "create", "-d", "cli-id-x509", "--am", "x509_thumbprint",
                          "--ptp", THUMBPRINT, "--sta", "disabled"))
    assert thumb["authentication"]["type"] == "selfSigned" and thumb["status"] == "disabled"
    assert thumb["authentication"]["x509Thumbprint"] == {"primaryThumbprint": THUMBPRINT.upper(),
                                                         "secondaryThumbprint": None}
    ca = ok(server.cli("hub", "device-identity", "create", "-d", "cli-id-ca", "--auth-method", "x509_ca"))
    assert ca["authentication"]["type"] == "certificateAuthority"
    given = ok(server.cli("hub", "device-identity", "create", "-d", "cli-id-keys", "--pk", "cHJpbWFyeS1rZXktMDEyMzQ1Njc4OQ==",
                          "--sk", "c2Vjb25kYXJ5LWtleS0wMTIzNDU2Nzg5"))
    assert given["authentication"]["symmetricKey"] == {"primaryKey": "cHJpbWFyeS1rZXktMDEyMzQ1Njc4OQ==",
                                                       "secondaryKey": "c2Vjb25kYXJ5LWtleS0wMTIzNDU2Nzg5"}

    assert refused(server.cli("hub", "device-identity", "create", "-d", "cli-id-sas")) == (
        "error: device 'cli-id-sas' already exists in hub 'default' (use 'device-identity update')")
    refused(server.cli("hub", "device-identity", "create", "-d", "cli-id-bad", "--am", "x509_thumbprint"),
            "--primary-thumbprint")
    refused(server.cli("hub", "device-identity", "create", "-d", "cli-id-bad", "--am", "x509_ca", "--pk", "a2V5"),
            "--auth-method shared_private_key")
    refused(server.cli("hub", "device-identity", "create", "-d", "cli-id-bad", "--pk", "a2V5"), "--secondary-key")
    refused(server.cli("hub", "device-identity", "show", "-d", "cli-id-bad"), "does not exist", "HTTP 404")

    listed = {d["deviceId"]: d for d in ok(server.cli("hub", "device-identity", "list"))}
    assert {"cli-id-sas", "cli-id-x509", "cli-id-ca", "cli-id-keys"} <= set(listed)
    assert listed["cli-id-x509"]["status"] == "disabled" and listed["cli-id-ca"]["authentication"]["type"] == (
        "certificateAuthority")
    assert listed["cli-id-sas"]["authentication"]["symmetricKey"]["primaryKey"] is None  # a list shows no keys
    assert len(ok(server.cli("hub", "device-identity", "list", "--top", "2"))) == 2
    table = server.cli("hub", "device-identity", "list", "-o", "table")
    assert table.returncode == 0, table.stderr
    assert all(c in table.stdout for c in ("deviceId", "status", "authentication.type", "connectionState"))
    [row] = [line for line in table.stdout.splitlines() if " cli-id-x509 " in line]
    assert [cell.strip() for cell in row.strip("│ ").split("│")] == ["cli-id-x509", "disabled", "selfSigned",
                                                                     "Disconnected"]

    disabled = ok(server.cli("hub", "device-identity", "update", "-d", "cli-id-sas", "--status", "disabled"))
    assert disabled["status"] == "disabled" and disabled["authentication"]["symmetricKey"] == keys
    assert disabled["etag"] != created["etag"]
    rekeyed = ok(server.cli("hub", "device-identity", "update", "-d", "cli-id-sas", "--pk", "bmV3LWtleS0wMTIzNDU2Nzg5YWI=",
                            "--etag", disabled["etag"]))
    assert rekeyed["authentication"]["symmetricKey"] == {"primaryKey": "bmV3LWtleS0wMTIzNDU2Nzg5YWI=",
                                                         "secondaryKey": keys["secondaryKey"]}
    assert rekeyed["status"] == "disabled"
    refused(server.cli("hub", "device-identity", "update", "-d", "cli-id-sas", "--sta", "enabled", "--etag",
                       disabled["etag"]), "HTTP 412")
    refused(server.cli("hub", "device-identity", "update", "-d", "cli-id-sas"), "nothing to update")
    refused(server.cli("hub", "device-identity", "update", "-d", "cli-id-none", "--sta", "enabled"),
            "'cli-id-none' does not exist")

    refused(server.cli("hub", "device-identity", "delete", "-d", "cli-id-sas", "--etag", created["etag"]),
            "does not match", "HTTP 412")
    assert ok(server.cli("hub", "device-identity", "show", "-d", "cli-id-sas"))["etag"] == rekeyed["etag"]
    deleted = server.cli("hub", "device-identity", "delete", "-d", "cli-id-sas", "--etag", rekeyed["etag"])
    assert deleted.returncode == 0 and deleted.stdout == "", deleted.stderr
    refused(server.cli("hub", "device-identity", "show", "-d", "cli-id-sas"), "HTTP 404")
    assert server.cli("hub", "device-identity", "delete", "-d", "cli-id-ca").returncode == 0
    refused(server.cli("hub", "device-identity", "list", "-n", "no-such-hub"), "no-such-hub")


def test_device_twin_update_and_show(server, tmp_path):
    sas_device(server, "cli-twin")
    before = ok(server.cli("hub", "device-twin", "show", "--device-id", "cli-twin"))
    assert before["tags"] == {} and before["properties"]["desired"] == {"$version": 1}
    tags_file = tmp_path / "tags.json"
    tags_file.write_text('{"site": "berlin", "floor": 3}')
    updated = ok(server.cli("hub", "device-twin", "update", "-d", "cli-twin", "--desired",
                            '{"interval": 5, "mode": {"eco": true}}', "--tags", str(tags_file)))
    assert updated["properties"]["desired"] == {"interval": 5, "mode": {"eco": True}, "$version": 2}
    shown = ok(server.cli("hub", "device-twin", "show", "-d", "cli-twin"))
    assert shown["tags"] == {"site": "berlin", "floor": 3}
    assert shown["properties"]["desired"] == {"interval": 5, "mode": {"eco": True}, "$version": 2}
    assert shown["version"] == before["version"] + 1 and shown["etag"] == updated["etag"] != before["etag"]
    # a merge patch: null deletes, other keys stay; tags alone do not bump the desired version
    ok(server.cli("hub", "device-twin", "update", "-d", "cli-twin", "--desired", '{"mode": null}', "--etag",
                  updated["etag"]))
    tagged = ok(server.cli("hub", "device-twin", "update", "-d", "cli-twin", "--tags", '{"floor": null}'))
    assert tagged["tags"] == {"site": "berlin"} and tagged["properties"]["desired"] == {"interval": 5, "$version": 3}
    refused(server.cli("hub", "device-twin", "update", "-d", "cli-twin", "--tags", "{}", "--etag", updated["etag"]),
            "HTTP 412")
    refused(server.cli("hub", "device-twin", "update", "-d", "cli-twin", "--desired", "[1]"), "must be a JSON object")
    refused(server.cli("hub", "device-twin", "update", "-d", "cli-twin"), "nothing to update")
    refused(server.cli("hub", "device-twin", "show", "-d", "cli-twin-none"), "HTTP 404")


def test_c2d_message_send(server):
    key = sas_device(server, "cli-c2d")
    d = connect(server, "cli-c2d", key, "devices/cli-c2d/messages/devicebound/#")
    try:
        sent = ok(server.cli("hub", "c2d-message", "send", "-d", "cli-c2d", "--data", "hello device", "--props",
                             "color=blue;size=L", "--message-id", "cli-c2d-1", "--correlation-id", "corr-7", "--ct",
                             "text/plain", "--ce", "utf-8", "--ack", "full", "--ttl", "60"))
        assert sent == {"messageId": "cli-c2d-1"}
        topic, payload = d.expect("devices/cli-c2d/messages/devicebound/")
        assert payload == b"hello device"
        assert topic == ("devices/cli-c2d/messages/devicebound/%24.mid=cli-c2d-1"
                         "&%24.to=%2Fdevices%2Fcli-c2d%2Fmessages%2FdeviceBound&%24.cid=corr-7&%24.ct=text%2Fplain"
                         "&%24.ce=utf-8&iothub-ack=full&color=blue&size=L")
    finally:
        d.close()
    queued = ok(server.cli("hub", "c2d-message", "send", "-d", "cli-c2d"))  # offline: queued, id generated
    assert str(uuid.UUID(queued["messageId"])) == queued["messageId"]
    refused(server.cli("hub", "c2d-message", "send", "-d", "cli-c2d-none", "--data", "x"),
            "'cli-c2d-none' does not exist", "HTTP 404")
    refused(server.cli("hub", "c2d-message", "send", "-d", "cli-c2d", "--props", "novalue"), "name=value")
    refused(server.cli("hub", "c2d-message", "send", "-d", "cli-c2d", "--ttl", "0"), "--ttl")
    # az iot device c2d-message purge: the offline message above goes
    purged = ok(server.cli("hub", "c2d-message", "purge", "-d", "cli-c2d"))
    assert purged["deviceId"] == "cli-c2d" and purged["totalMessagesPurged"] == 1, purged
    assert ok(server.cli("hub", "c2d-message", "purge", "-d", "cli-c2d"))["totalMessagesPurged"] == 0
    refused(server.cli("hub", "c2d-message", "purge", "-d", "cli-c2d-none"), "'cli-c2d-none' does not exist", "HTTP 404")


def test_consecutive_c2d_messages_reach_a_connected_device(server):
    key = sas_device(server, "cli-c2d-seq")
    d = connect(server, "cli-c2d-seq", key, "devices/cli-c2d-seq/messages/devicebound/#")
    try:
        for n in range(3):
            assert ok(server.cli("hub", "c2d-message", "send", "-d", "cli-c2d-seq", "--da", f"m{n}", "--mid",
                                 f"seq-{n}")) == {"messageId": f"seq-{n}"}
            _, payload = d.expect("devices/cli-c2d-seq/messages/devicebound/", timeout=3)
            assert payload == f"m{n}".encode()
    finally:
        d.close()


def test_monitor_events(server):
    key = sas_device(server, "cli-mon")
    d = connect(server, "cli-mon", key)
    try:
        d.publish("devices/cli-mon/messages/events/%24.mid=t-1&%24.ct=application%2Fjson&line=a%20b",
                  json.dumps({"temperature": 21.5}))
        d.publish("devices/cli-mon/messages/events/seq=2", "plain text")
    finally:
        d.close()
    out = server.cli("hub", "monitor-events", "--device-id", "cli-mon", "--from", "earliest", "--count", "1",
                     "--timeout", "10")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith('{\n  "event": {\n')  # pretty, as az prints
    first = json.loads(out.stdout)
    event = first["event"]
    assert (event["origin"], event["payload"], event["properties"]["application"]) == (
        "cli-mon", {"temperature": 21.5}, {"line": "a b"})
    system = event["properties"]["system"]
    assert (system["message-id"], system["content-type"], system["iothub-connection-device-id"]) == (
        "t-1", "application/json", "cli-mon")
    # resume after the first one's position, one compact line per event; then nothing is left
    rest = server.cli("hub", "monitor-events", "-d", "cli-mon", "--from", str(first["position"]), "--timeout", "1",
                      "-o", "jsonl")
    assert rest.returncode == 0, rest.stderr
    [line] = rest.stdout.splitlines()
    second = json.loads(line)
    assert (second["event"]["payload"], second["event"]["properties"]["application"]) == ("plain text", {"seq": "2"})
    assert second["position"] > first["position"]
    done = server.cli("hub", "monitor-events", "-d", "cli-mon", "--from", str(second["position"]), "--to", "1")
    assert done.returncode == 0 and done.stdout == "", done.stderr
    refused(server.cli("hub", "monitor-events", "--from", "yesterday"), "--from")


def interrupt_monitor(env: dict, *args: str) -> tuple[int, str, str]:
    """Run ``opendps hub monitor-events`` in a real process, press Ctrl-C once the stream is open."""
    proc = subprocess.Popen([sys.executable, "-m", "opendps", "hub", "monitor-events", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if we ignore it
    try:
        banner = proc.stderr.readline()
        assert banner.startswith("Starting event monitor on all devices"), banner  # the stream is open
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def test_monitor_events_stops_quietly_on_ctrl_c(server):
    assert interrupt_monitor(server.env, "--timeout", "5") == (0, "", "")


def test_abandoned_follow_stream_does_not_outlive_its_client(tmp_path):
    with database("sqlite", tmp_path) as db_url:
        run = _run_server(db_url, tmp_path)
        own = next(run)
        try:
            assert interrupt_monitor(own.env, "--timeout", "0") == (0, "", "")
            own.proc.terminate()
            own.proc.wait(timeout=5)  # an idle server stops in well under a second
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not stop within 5 s of SIGTERM: the abandoned event stream still runs")
        finally:
            if own.proc.poll() is None:
                own.proc.kill()
            next(run, None)  # the fixture's own teardown (log file)


def test_invoke_device_method_and_desired_push(server):
    key = sas_device(server, "cli-method")
    d = connect(server, "cli-method", key, "$iothub/methods/POST/#", "$iothub/twin/PATCH/properties/desired/#")
    try:
        wait_connection_state(server, "cli-method", "Connected")
        updated = ok(server.cli("hub", "device-twin", "update", "-d", "cli-method", "--desired", '{"interval": 7}'))
        topic, payload = d.expect("$iothub/twin/PATCH/properties/desired/")
        assert updated["properties"]["desired"] == {"interval": 7, "$version": 2}
        assert topic == "$iothub/twin/PATCH/properties/desired/?$version=2"
        assert json.loads(payload) == {"interval": 7, "$version": 2}

        def answer() -> None:
            topic, payload = d.expect("$iothub/methods/POST/")
            name, _, rid = topic[len("$iothub/methods/POST/"):].partition("/?$rid=")
            d.publish(f"$iothub/methods/res/201/?$rid={rid}", json.dumps({"method": name, "got": json.loads(payload)}))

        t = threading.Thread(target=answer)
        t.start()
        result = server.cli("hub", "invoke-device-method", "-d", "cli-method", "--method-name", "reboot",
                            "--method-payload", '{"delay": 5}', "--timeout", "20")
        t.join(30)
        assert ok(result) == {"status": 201, "payload": {"method": "reboot", "got": {"delay": 5}}}
        # nobody answers: the server's 504 comes back before the CLI's own HTTP timeout
        late = server.cli("hub", "invoke-device-method", "-d", "cli-method", "--mn", "ignored", "--to", "1")
        refused(late, "HTTP 504")
        d.expect("$iothub/methods/POST/ignored/")
    finally:
        d.close()
    wait_connection_state(server, "cli-method", "Disconnected")
    refused(server.cli("hub", "invoke-device-method", "-d", "cli-method", "--mn", "reboot", "--to", "5"),
            "not connected", "HTTP 404")
    # az's --method-connect-timeout: the call waits that long for the device to connect, then says why it gave up
    refused(server.cli("hub", "invoke-device-method", "-d", "cli-method", "--mn", "reboot", "--mct", "1"),
            "timed out waiting for device 'cli-method' to connect", "HTTP 404")
    refused(server.cli("hub", "invoke-device-method", "-d", "cli-method", "--mn", "x", "--mp", "{bad"),
            "--method-payload is not valid JSON")


def test_hub_connection_string_and_login(server):
    info = ok(server.cli("info", "--show-secrets", "-o", "json"))
    [default] = [h for h in info["hubs"] if h["name"] == "default"]
    shown = ok(server.cli("hub", "connection-string", "show"))
    port = urlsplit(server.url).port
    conn = shown["connectionString"]
    assert conn == default["connectionString"]
    assert conn.startswith(f"HostName=localhost:{port};SharedAccessKeyName=iothubowner;SharedAccessKey=")
    secondary = ok(server.cli("hub", "connection-string", "show", "--hub-name", "default", "--key-type",
                              "secondary"))["connectionString"]
    assert secondary != conn and secondary.startswith(f"HostName=localhost:{port};SharedAccessKeyName=iothubowner;")
    refused(server.cli("hub", "connection-string", "show", "-n", "no-such-hub"), "no hub named 'no-such-hub'")
    refused(server.cli("hub", "connection-string", "show", "--policy-name", "registryRead"), "registryRead")

    # the hub owner connection string works for the hub service API (its token names the hub) ...
    created = ok(server.cli("hub", "device-identity", "create", "-d", "cli-login-dev", "--login", conn))
    for login in (conn, secondary):
        listed = ok(server.cli("hub", "device-identity", "list", "--login", login))
        assert "cli-login-dev" in [d["deviceId"] for d in listed]
    assert ok(server.cli("hub", "device-identity", "show", "-d", "cli-login-dev", "-n", "default", "--login", conn)
              )["etag"] == created["etag"]
    refused(server.cli("hub", "device-identity", "list", "--login", conn, "-n", "other"), "not 'other'", "HTTP 400")
    # ... and for nothing else
    refused(server.cli("adr", "ns", "list", "--login", conn), "iothubowner", "HTTP 403")
    refused(server.cli("dps", "enrollment", "list", "--login", conn), "HTTP 403")


def test_certificate_list_after_an_enrollment_with_a_credential_policy(server):
    ok(server.cli("adr", "ns", "create", "--name", "cli-hubca-ns", "--policy-name", "cli-hubca-p"))
    policy = ok(server.cli("adr", "ns", "policy", "show", "--namespace", "cli-hubca-ns", "--name", "cli-hubca-p"))
    assert "cli-hubca-ns-cli-hubca-p" not in [c["name"] for c in ok(server.cli("hub", "certificate", "list"))]
    ok(server.cli("dps", "enrollment", "create", "--enrollment-id", "cli-hubca-dev", "--attestation-type",
                  "symmetrickey", "--credential-policy", "cli-hubca-p"))
    listed = {c["name"]: c for c in ok(server.cli("hub", "certificate", "list", "--hub-name", "default"))}
    ca = listed["cli-hubca-ns-cli-hubca-p"]["properties"]
    issuing = policy["properties"]["certificate"]["certificateAuthorityConfiguration"]
    assert (ca["subject"], ca["namespace"], ca["policy"], ca["enrollments"]) == (
        issuing["subject"], "cli-hubca-ns", "cli-hubca-p", ["cli-hubca-dev"])
    assert ca["certificate"] == issuing["certificate"]
    table = server.cli("hub", "certificate", "list", "-o", "table")
    assert table.returncode == 0 and "cli-hubca-ns-cli-hubca-p" in table.stdout, table.stderr
    refused(server.cli("hub", "certificate", "list", "-n", "no-such-hub"), "HTTP 404")


def test_device_identity_create_refuses_non_base64_keys(server):
    refused(server.cli("hub", "device-identity", "create", "-d", "cli-bug-key", "--pk", "not base64!",
                       "--sk", "also not"), "HTTP 400")


def test_device_identity_create_refuses_malformed_thumbprints(server):
    refused(server.cli("hub", "device-identity", "create", "-d", "cli-bug-thumb", "--am", "x509_thumbprint",
                       "--ptp", "aa:bb"), "HTTP 400")


def test_hub_certificate_proof_of_possession_verbs(server, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from tests.test_device_api import make_ca, make_leaf

    own = make_ca("cli-hub-own")
    (tmp_path / "own.pem").write_text(own.pem)
    created = ok(server.cli("hub", "certificate", "create", "--name", "cli-own", "--path", str(tmp_path / "own.pem")))
    assert created["properties"]["isVerified"] is False
    refused(server.cli("hub", "certificate", "generate-verification-code", "--name", "cli-own", "--etag", "stale"), "412")
    code = ok(server.cli("hub", "certificate", "generate-verification-code", "--name", "cli-own", "--etag",
                         created["etag"]))
    proof, _ = make_leaf(code["properties"]["verificationCode"], own)
    (tmp_path / "proof.pem").write_bytes(proof.public_bytes(serialization.Encoding.PEM))
    verified = ok(server.cli("hub", "certificate", "verify", "--name", "cli-own", "--path", str(tmp_path / "proof.pem"),
                             "--etag", code["etag"]))
    assert verified["properties"]["isVerified"] is True
    assert ok(server.cli("hub", "certificate", "show", "--name", "cli-own"))["properties"]["isVerified"] is True
    listed = ok(server.cli("hub", "certificate", "list"))
    assert [c["properties"]["source"] for c in listed if c["name"] == "cli-own"] == ["uploaded"]
    assert server.cli("hub", "certificate", "delete", "--name", "cli-own").returncode == 0
    refused(server.cli("hub", "certificate", "show", "--name", "cli-own"), "404")


def test_hub_policy_renew_key(server):
    """Issue 12.3: az iot hub policy renew-key; the connection string shows the new key."""
    before = ok(server.cli("hub", "connection-string", "show", "--key-type", "secondary"))["connectionString"]
    renewed = ok(server.cli("hub", "policy", "renew-key", "--renew-key", "secondary"))
    assert renewed["keyName"] == "iothubowner" and renewed["secondaryKey"] not in before
    after = ok(server.cli("hub", "connection-string", "show", "--key-type", "secondary"))["connectionString"]
    assert after.endswith(f"SharedAccessKey={renewed['secondaryKey']}")
    refused(server.cli("hub", "policy", "renew-key", "--renew-key", "secondary", "--policy-name", "registryRead"),
            "hubs have only 'iothubowner'")


def test_device_twin_replace(server, tmp_path):
    """Issue 12.18: az iot hub device-twin replace; tags and desired replaced wholesale, the change pushed."""
    key = sas_device(server, "cli-rep")
    before = ok(server.cli("hub", "device-twin", "update", "-d", "cli-rep", "--tags", '{"site": "lab", "old": 1}',
                           "--desired", '{"interval": 5, "mode": {"eco": true, "level": 2}}'))
    assert before["properties"]["desired"]["$version"] == 2
    d = connect(server, "cli-rep", key, "$iothub/twin/PATCH/properties/desired/#")
    try:
        wait_connection_state(server, "cli-rep", "Connected")
        twin_file = tmp_path / "twin.json"
        twin_file.write_text(json.dumps({"deviceId": "cli-rep", "etag": "ignored", "tags": {"site": "plant"},
                                         "properties": {"desired": {"mode": {"eco": True}, "rate": 9, "$version": 1},
                                                        "reported": {"forged": 1}}}))
        replaced = ok(server.cli("hub", "device-twin", "replace", "-d", "cli-rep", "--json", str(twin_file)))
        assert replaced["tags"] == {"site": "plant"}  # "old" is gone: replaced, not merged
        assert replaced["properties"]["desired"] == {"mode": {"eco": True}, "rate": 9, "$version": 3}
        assert replaced["properties"]["reported"] == {"$version": 1}  # reported properties in the body are ignored
        assert replaced["etag"] != before["etag"] and replaced["connectionState"] == "Connected"
        # the device gets the merge patch that turns its old desired properties into the new ones
        topic, payload = d.expect("$iothub/twin/PATCH/properties/desired/")
        assert topic == "$iothub/twin/PATCH/properties/desired/?$version=3"
        assert json.loads(payload) == {"interval": None, "mode": {"level": None}, "rate": 9, "$version": 3}
    finally:
        d.close()
    refused(server.cli("hub", "device-twin", "replace", "-d", "cli-rep", "--json", "{}", "--etag", before["etag"]),
            "does not match", "HTTP 412")
    inline = ok(server.cli("hub", "device-twin", "replace", "-d", "cli-rep", "-j", '{"tags": {"x": 1}}', "--etag",
                           replaced["etag"]))
    assert inline["tags"] == {"x": 1} and inline["properties"]["desired"] == {"$version": 4}  # left out: emptied
    assert ok(server.cli("hub", "device-twin", "show", "-d", "cli-rep"))["etag"] == inline["etag"]
    refused(server.cli("hub", "device-twin", "replace", "-d", "cli-rep", "--json", "[1]"), "must be a JSON object")
    refused(server.cli("hub", "device-twin", "replace", "-d", "cli-rep", "--json", "{bad"), "--json is not valid JSON")
    refused(server.cli("hub", "device-twin", "replace", "-d", "cli-rep-none", "--json", "{}"), "HTTP 404")
    refused(server.cli("hub", "device-twin", "replace", "-d", "cli-rep", "--json", '{"tags": {"$x": 1}}'),
            "reserved or invalid", "HTTP 400")

    deep: dict = {"leaf": 1}
    for _ in range(11):  # eleven levels of objects under desired
        deep = {"n": deep}
    with svc(server) as c:
        for body, words in (({"tags": [1]}, "tags must be a JSON object"),
                            ({"properties": [1]}, "properties must be a JSON object"),
                            ({"properties": {"desired": "x"}}, "desired properties must be a JSON object"),
                            ({"properties": {"desired": deep}}, "nested more than 10 levels"),
                            ({"deviceId": "someone-else"}, "does not match 'cli-rep'")):
            _assert_error(c.put("/twins/cli-rep", json=body), 400, 400004, words)
        _assert_error(c.patch("/twins/cli-rep", json={"properties": "x"}), 400, 400004, "properties must be")
        _assert_error(c.put("/twins/cli-rep", content=b"[1]"), 400, 400004, "must be a JSON object")
        _assert_error(c.put("/twins/cli-rep", content=b""), 400, 400004, "request body is required")
        _assert_error(c.put("/twins/cli-rep", json={"tags": {"big": "x" * 9000}}), 413, 413001, "tags would exceed")
        _assert_error(c.put("/twins/cli-rep", json={}, headers={"If-Match": '"stale"'}), 412, 412001, "does not match")
        r = c.put("/twins/cli-rep", json={"tags": {"y": 2}}, headers={"If-Match": '"*"'})  # the Azure SDK's quoting
        assert r.status_code == 200, r.text
        assert r.headers["ETag"] == f'"{r.json()["etag"]}"' and r.json()["tags"] == {"y": 2}
        assert c.get("/twins/cli-rep").json()["properties"]["desired"] == {"$version": 5}
    log = (server.data_dir.parent / "server.log").read_text()
    assert "Traceback" not in log


def report(device: Device, rid: str, patch: dict) -> None:
    device.publish(f"$iothub/twin/PATCH/properties/reported/?$rid={rid}", json.dumps(patch))
    topic, _ = device.expect("$iothub/twin/res/")
    assert topic.startswith(f"$iothub/twin/res/204/?$rid={rid}"), topic


def test_hub_query(server):
    """Issue 12.18: az iot hub query and POST /devices/query: WHERE on tags and reported properties, COUNT,
    projections, paging with x-ms-max-item-count and x-ms-continuation, refusals as 400s."""
    ids = [f"cli-q-{n}" for n in range(5)]
    keys = {}
    for n, device_id in enumerate(ids):
        keys[device_id] = sas_device(server, device_id)
        ok(server.cli("hub", "device-twin", "update", "-d", device_id, "--tags",
                      json.dumps({"suite": "cli-q", "site": "lab" if n % 2 == 0 else "plant", "n": n})))
    mine = "tags.suite = 'cli-q'"
    hot = connect(server, "cli-q-3", keys["cli-q-3"], "$iothub/twin/res/#")
    try:
        report(hot, "r1", {"temp": 31.5, "fw": "2.0"})
        cold = connect(server, "cli-q-1", keys["cli-q-1"], "$iothub/twin/res/#")
        report(cold, "r2", {"temp": 12})
        cold.close()
        wait_connection_state(server, "cli-q-1", "Disconnected")
        wait_connection_state(server, "cli-q-3", "Connected")

        twins = ok(server.cli("hub", "query", "-q", f"SELECT * FROM devices WHERE {mine}"))
        assert [t["deviceId"] for t in twins] == ids  # device id order
        assert twins[3]["properties"]["reported"]["temp"] == 31.5 and twins[3]["tags"]["site"] == "plant"
        hot_rows = ok(server.cli("hub", "query", "--query-command",
                                 f"select deviceId, tags.n, properties.reported.temp AS t from devices "
                                 f"where {mine} and properties.reported.temp > 20"))
        assert hot_rows == [{"deviceId": "cli-q-3", "n": 3, "t": 31.5}]
        connected = ok(server.cli("hub", "query", "-q",
                                  f"SELECT deviceId FROM devices WHERE {mine} AND connectionState = 'Connected'"))
        assert connected == [{"deviceId": "cli-q-3"}]
    finally:
        hot.close()
    lab = ok(server.cli("hub", "query", "-q", f"SELECT deviceId FROM devices WHERE {mine} AND tags.site IN ['lab'] "
                                               "AND NOT IS_DEFINED(properties.reported.temp)"))
    assert lab == [{"deviceId": "cli-q-0"}, {"deviceId": "cli-q-2"}, {"deviceId": "cli-q-4"}]
    assert ok(server.cli("hub", "query", "-q", f"SELECT COUNT() AS n FROM devices WHERE {mine} AND tags.site = 'lab'")
              ) == [{"n": 3}]
    top = ok(server.cli("hub", "query", "-q", f"SELECT * FROM devices WHERE {mine}", "--top", "2"))
    assert [t["deviceId"] for t in top] == ids[:2]
    assert ok(server.cli("hub", "query", "-q", f"SELECT * FROM devices WHERE {mine}", "--query", "[].tags.n")
              ) == [0, 1, 2, 3, 4]  # -q is the hub query, --query the JMESPath on its answer (as az)
    table = server.cli("hub", "query", "-q", f"SELECT * FROM devices WHERE {mine}", "-o", "table")
    assert table.returncode == 0 and "connectionState" in table.stdout and "cli-q-4" in table.stdout, table.stderr
    conn = ok(server.cli("hub", "connection-string", "show"))["connectionString"]
    assert len(ok(server.cli("hub", "query", "-q", f"SELECT * FROM devices WHERE {mine}", "--login", conn))) == 5
    refused(server.cli("hub", "query", "-q", "SELECT * FROM devices.modules"), "FROM devices.modules is not supported",
            "HTTP 400")
    refused(server.cli("hub", "query", "-q", "SELECT * FROM devices", "--top", "0"), "--top")
    refused(server.cli("hub", "query", "-q", "SELECT * FROM devices", "-n", "no-such-hub"), "no-such-hub", "HTTP 404")

    query = {"query": f"SELECT * FROM devices WHERE {mine}"}
    with svc(server) as c:
        seen, token, pages = [], None, 0
        while True:
            headers = {"x-ms-max-item-count": "2", **({"x-ms-continuation": token} if token else {})}
            r = c.post("/devices/query", json=query, headers=headers)
            assert r.status_code == 200, r.text
            assert (r.headers["x-ms-item-type"], r.headers["x-ms-max-item-count"]) == ("Twin", "2")
            seen += [t["deviceId"] for t in r.json()]
            pages += 1
            token = r.headers.get("x-ms-continuation")
            if token is None:
                break
        assert (seen, pages) == (ids, 3)
        first = c.post("/devices/query", json=query, headers={"x-ms-max-item-count": "2"})
        raw = c.post("/devices/query/", json={"query": f"SELECT COUNT() FROM devices WHERE {mine}"})  # a spelling
        assert (raw.status_code, raw.json(), raw.headers["x-ms-item-type"]) == (200, [{"$1": 5}], "Raw")
        assert "x-ms-continuation" not in raw.headers
        for body, headers, words in (
                ({"query": "SELECT * FROM devices GROUP BY tags.site"}, {}, "GROUP BY is not supported"),
                ({"query": "SELECT * FROM devices WHERE tags.x = 'open"}, {}, "unterminated string"),
                ({"query": "SELECT * FROM devices WHERE tags.x + 1 = 2"}, {}, "arithmetic"),
                ({}, {}, 'needs "query"'),
                ({"query": 7}, {}, 'needs "query"'),
                (query, {"x-ms-max-item-count": "0"}, "x-ms-max-item-count must be"),
                (query, {"x-ms-max-item-count": "many"}, "x-ms-max-item-count must be"),
                (query, {"x-ms-continuation": "garbage"}, "not a continuation token"),
                ({"query": "SELECT deviceId FROM devices"}, {"x-ms-continuation": first.headers["x-ms-continuation"]},
                 "belongs to another query")):
            _assert_error(c.post("/devices/query", json=body, headers=headers), 400, 400004, words)
        _assert_error(c.post("/devices/query", content=b"SELECT * FROM devices"), 400, 400004, "not valid JSON")
    log = (server.data_dir.parent / "server.log").read_text()
    assert "Traceback" not in log


def test_device_identity_list_follows_the_pages_past_a_thousand(server):
    """GET /devices answers at most 1,000 identities, as IoT Hub does; the CLI lists all of them (or --top) by
    following opendps' x-ms-continuation. 1,001 copies of one identity row are written straight to the store."""
    from sqlalchemy import insert, select

    from opendps.store import HubDevice, Store, table_of

    ok(server.cli("hub", "device-identity", "create", "-d", "page-0000", "--am", "x509_ca"))
    store = Store(server.db_url)
    try:
        table = table_of(HubDevice)
        with store.session() as s:
            conn = s.connection()
            template = dict(conn.execute(select(table).where(table.c.device_key == "page-0000")).mappings().one())
            template.pop("id")
            conn.execute(insert(table), [{**template, "device_id": f"Page-{i:04}", "device_key": f"page-{i:04}"}
                                         for i in range(1, 1002)])
    finally:
        store.dispose()
    listed = [d["deviceId"] for d in ok(server.cli("hub", "device-identity", "list"))]
    paged = [d for d in listed if d.lower().startswith("page-")]
    assert paged == ["page-0000", *(f"Page-{i:04}" for i in range(1, 1002))]
    assert len(listed) == len(set(listed))
    assert [d["deviceId"] for d in ok(server.cli("hub", "device-identity", "list", "--top", "1001"))] == listed[:1001]
    # the DPS side's list of the hub's twins is paged too (1,000 a page), and the CLI follows its continuationToken
    twins = [d["deviceId"] for d in ok(server.cli("dps", "linked-hub", "device-list", "-n", "default"))]
    assert twins == listed
