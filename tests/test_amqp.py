"""Service-side C2D over AMQP 1.0 (the path azure-iot-hub's send_c2d_message takes), with a real client.

python-qpid-proton's own blocking client (not opendps code) connects over TLS trusting the server CA, uses
SASL ANONYMOUS and does claims-based security by hand (a ``$cbs`` link pair and a ``put-token`` request),
then sends to ``/messages/devicebound``. What it sends must be in the store with its properties and reach
a device connected over MQTT (paho); every refusal must be an AMQP error with nothing queued. The other
SDKs' shapes are replayed too: C# and C (``to`` spelled ``deviceBound``, URL-encoded ids, the feedback
receiver ``OpenAsync`` and ``IoTHubMessaging_LL_Open`` attach) and C's SASL PLAIN instead of CBS.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from urllib.parse import quote, unquote

import pytest
from proton import ConnectionException, Data, Delivery, Message, SSLDomain, Timeout, int32, symbol, ulong
from proton.utils import BlockingConnection, LinkDetached
from sqlalchemy import select
from tests.test_device_api import svc
from tests.test_mqtt_hub import HUB, Client, hub_username, pending_c2d

from opendps.store import CloudToDeviceMessage, Store
from opendps.transport import sas

SERVER_STORES = ("sqlite",)  # the CLI/SDK/front end is the subject, not the store (tests/conftest.py)

pytestmark = pytest.mark.timeout(300, func_only=True)
SAS_TYPE = "servicebus.windows.net:sastoken"


class Amqp:
    """A proton BlockingConnection to the AMQP listener, with CBS put-token and C2D sends made by hand.

    ``plain=(user, password)`` authenticates with SASL PLAIN, as the C service SDK does, instead of ANONYMOUS."""

    def __init__(self, server, timeout: float = 20, plain: tuple[str, str] | None = None):
        domain = SSLDomain(SSLDomain.MODE_CLIENT)
        domain.set_trusted_ca_db(str(server.ca_file))
        domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
        sasl = {"allowed_mechs": "PLAIN", "user": plain[0], "password": plain[1]} if plain else {
            "allowed_mechs": "ANONYMOUS"}
        self.conn = BlockingConnection(f"amqps://localhost:{server.amqp_port}", ssl_domain=domain, timeout=timeout,
                                       **sasl)
        self.next_id = 1
        self.cbs = None

    def put_token(self, token: str, audience: str = "https://localhost", token_type: object = SAS_TYPE) -> tuple[int, str]:
        """One put-token request; (status-code, status-description) of the answer."""
        if self.cbs is None:
            self.cbs = (self.conn.create_sender("$cbs"), self.conn.create_receiver("$cbs"))
        sender, receiver = self.cbs
        request_id = ulong(self.next_id)
        self.next_id += 1
        sender.send(Message(id=request_id, body=token, properties={
            "operation": "put-token", "type": token_type, "name": audience, "expiration": int(time.time()) + 3600}))
        answer = receiver.receive(timeout=20)
        receiver.accept()
        assert answer.correlation_id == request_id, answer
        # uamqp reads the status with amqpvalue_get_int: an AMQP int (int32), not a long
        assert isinstance(answer.properties["status-code"], int32), type(answer.properties["status-code"])
        return answer.properties["status-code"], answer.properties["status-description"]

    def devicebound(self, address: str = "/messages/devicebound"):
        return self.conn.create_sender(address)

    def send(self, sender, message: Message) -> tuple[int, str | None, str | None]:
        """Send unsettled and wait for the outcome: (state, error condition, description)."""
        delivery = sender.link.send(message)
        self.conn.wait(lambda: delivery.remote_state in (Delivery.ACCEPTED, Delivery.REJECTED, Delivery.RELEASED,
                                                         Delivery.MODIFIED) or delivery.settled,
                       timeout=20, msg="no outcome for the C2D message")
        cond = delivery.remote.condition
        delivery.settle()
        return delivery.remote_state, cond.name if cond else None, cond.description if cond else None

    def close(self) -> None:
        self.conn.close()


def hub_owner_token(server, host: str = "localhost", *, key: str | None = None, ttl: int = 3600) -> str:
    """iothubowner's token as azure-iot-hub makes it (sr = the HostName of the hub connection string)."""
    out = server.cli("hub", "connection-string", "show", check=True)
    cs = json.loads(out.stdout)
    cs = sas.parse_connection_string(cs["connectionString"] if isinstance(cs, dict) else cs)
    return sas.generate(cs["HostName"].replace("localhost", host, 1), key or cs["SharedAccessKey"], "iothubowner", ttl=ttl)


def dps_owner_token(server) -> str:
    cs = sas.parse_connection_string(server.connection_string)
    return sas.generate(cs["HostName"], cs["SharedAccessKey"], cs["SharedAccessKeyName"])


def c2d(device_id: str, body: bytes = b"hello", **fields) -> Message:
    return Message(address=f"/devices/{device_id}/messages/devicebound", body=body, **fields)


def queued(server, device_id: str) -> list[CloudToDeviceMessage]:
    store = Store(server.db_url)
    try:
        with store.session() as s:
            rows = s.scalars(select(CloudToDeviceMessage).where(CloudToDeviceMessage.device_key == device_id.lower())
                             .order_by(CloudToDeviceMessage.id)).all()
            s.expunge_all()
            return list(rows)
    finally:
        store.dispose()


def sas_device(server, device_id: str) -> str:
    """A SAS device in the default hub; its primary key."""
    with svc(server) as c:
        r = c.put(f"/devices/{device_id}", json={"deviceId": device_id})
        assert r.status_code == 200, r.text
        return r.json()["authentication"]["symmetricKey"]["primaryKey"]


def topic_properties(topic: str) -> dict[str, str | None]:
    bag = topic.split("/messages/devicebound/", 1)[1]
    out: dict[str, str | None] = {}
    for part in bag.split("&"):
        name, sep, value = part.partition("=")
        out[unquote(name)] = unquote(value) if sep else None
    return out


def test_c2d_over_amqp_is_queued_with_its_properties_and_delivered_over_mqtt(server):
    key = sas_device(server, "amqp-dev")
    client = Amqp(server)
    try:
        assert client.put_token(hub_owner_token(server)) == (200, "OK")
        # the SDK's address form: amqps://{HostName}/messages/devicebound
        sender = client.devicebound(f"amqps://localhost:{server.url.rsplit(':', 1)[1]}/messages/devicebound")
        state, cond, _ = client.send(sender, c2d("amqp-dev", b'{"led": "on"}', id="amqp-m1", correlation_id="corr-1",
                                                 content_type="application/json", content_encoding="utf-8",
                                                 properties={"color": "blue green", "iothub-ack": "full"}))
        assert (state, cond) == (Delivery.ACCEPTED, None)
        # accepted = durably queued, with every property mapped as the REST route maps its headers
        [row] = queued(server, "amqp-dev")
        assert row.message_id == "amqp-m1" and row.body == b'{"led": "on"}'
        assert row.system_properties == {"correlation-id": "corr-1", "content-type": "application/json",
                                         "content-encoding": "utf-8", "ack": "full"}
        assert row.properties == {"color": "blue green"}

        device = Client(server, "amqp-dev", hub_username("amqp-dev"), password=sas.generate(f"{HUB}/devices/amqp-dev", key))
        try:
            assert device.rc == 0
            device.subscribe("devices/amqp-dev/messages/devicebound/#")
            topic, payload = device.expect("devices/amqp-dev/messages/devicebound/")
            assert payload == b'{"led": "on"}'
            props = topic_properties(topic)
            assert {k: props.get(k) for k in ("$.mid", "$.cid", "$.ct", "$.ce", "iothub-ack", "color")} == {
                "$.mid": "amqp-m1", "$.cid": "corr-1", "$.ct": "application/json", "$.ce": "utf-8",
                "iothub-ack": "full", "color": "blue green"}
            # the DPS owner's token speaks for the default hub; a message sent while the device is online is pushed
            other = Amqp(server)
            try:
                assert other.put_token(dps_owner_token(server))[0] == 200
                state, cond, _ = other.send(other.devicebound(), c2d("amqp-dev", b"live", id="amqp-m2"))
                assert (state, cond) == (Delivery.ACCEPTED, None)
            finally:
                other.close()
            topic, payload = device.expect("devices/amqp-dev/messages/devicebound/")
            assert payload == b"live" and topic_properties(topic)["$.mid"] == "amqp-m2"
            deadline = time.time() + 10
            while queued(server, "amqp-dev") and time.time() < deadline:  # deleted on PUBACK
                time.sleep(0.1)
            assert queued(server, "amqp-dev") == []
        finally:
            device.close()
    finally:
        client.close()


@pytest.mark.parametrize("case", ["no-token", "bad-signature", "expired", "foreign-audience", "unknown-policy"])
def test_without_a_valid_token_the_devicebound_link_is_refused(server, case):
    sas_device(server, f"amqp-refused-{case}")
    before = pending_c2d(server)
    client = Amqp(server)
    try:
        if case != "no-token":
            token = {"bad-signature": lambda: hub_owner_token(server, key="d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXkh"),
                     "expired": lambda: hub_owner_token(server, ttl=-3600),
                     "foreign-audience": lambda: hub_owner_token(server, host="hub.example.com"),
                     "unknown-policy": lambda: dps_owner_token(server).replace("skn=provisioningserviceowner",
                                                                                "skn=registryRead")}[case]()
            status, description = client.put_token(token)
            assert status == 401, description
        with pytest.raises(LinkDetached) as refused:
            client.devicebound()
        assert "amqp:unauthorized-access" in str(refused.value)
        # the CBS links stay usable; the connection is still open for a good token
        assert client.put_token(hub_owner_token(server))[0] == 200
    finally:
        client.close()
    assert pending_c2d(server) == before


def test_a_put_token_with_a_type_of_another_amqp_type_is_answered_400(server):
    """The token type is looked up among the SAS types: a map, list or binary there was an internal error that closed
    the connection (a map cannot be looked up in a set). Now a 400 answer, and the connection takes a good token."""
    client = Amqp(server)
    try:
        for odd in ({"k": [1]}, [1, "a"], b"\x00\xff", 7, "x" * 500):
            status, description = client.put_token(hub_owner_token(server), token_type=odd)
            assert status == 400 and description.startswith("unsupported token type"), (odd, description)
            assert len(description) < 200  # the peer's value is cut, not echoed whole
        assert client.put_token(hub_owner_token(server))[0] == 200
    finally:
        client.close()
    assert "AMQP handler failed" not in _server_log(server)


def test_a_token_for_another_linked_hub_sends_to_that_hub_only(server):
    sas_device(server, "amqp-hub-a-dev")
    with svc(server) as c:
        r = c.put("/linkedHubs/amqp-other", json={"properties": {"hostName": "amqp-other.localhost"}})
        assert r.status_code in (200, 201), r.text
        other_key = c.get("/linkedHubs/amqp-other/keys").json()["primaryKey"]  # each hub signs with its own key
    client = Amqp(server)
    try:
        assert client.put_token(hub_owner_token(server, host="amqp-other.localhost", key=other_key))[0] == 200
        state, cond, description = client.send(client.devicebound(), c2d("amqp-hub-a-dev"))
        assert (state, cond) == (Delivery.REJECTED, "amqp:not-found"), description
        assert "amqp-other" in description
    finally:
        client.close()
    assert queued(server, "amqp-hub-a-dev") == []


def test_unknown_device_bad_address_and_a_full_queue_are_rejected(server):
    sas_device(server, "amqp-full-dev")
    client = Amqp(server)
    try:
        assert client.put_token(hub_owner_token(server))[0] == 200
        sender = client.devicebound()
        before = pending_c2d(server)
        state, cond, description = client.send(sender, c2d("amqp-nobody"))
        assert (state, cond) == (Delivery.REJECTED, "amqp:not-found") and "amqp-nobody" in description
        bad = Message(address="/devices/amqp-full-dev/messages/events", body=b"x")
        assert client.send(sender, bad)[:2] == (Delivery.REJECTED, "amqp:invalid-field")
        assert pending_c2d(server) == before
        for n in range(50):
            assert client.send(sender, c2d("amqp-full-dev", f"m{n}".encode()))[:2] == (Delivery.ACCEPTED, None), n
        state, cond, description = client.send(sender, c2d("amqp-full-dev", b"one too many"))
        assert (state, cond) == (Delivery.REJECTED, "amqp:resource-limit-exceeded"), description
        assert [r.body for r in queued(server, "amqp-full-dev")] == [f"m{n}".encode() for n in range(50)]
    finally:
        client.close()


def device_with_id(server, device_id: str) -> None:
    """A SAS device whose id needs URL-encoding in a path."""
    with svc(server) as c:
        r = c.put(f"/devices/{quote(device_id, safe='')}", json={"deviceId": device_id})
        assert r.status_code == 200, r.text


def test_every_sdks_to_address_reaches_the_device(server):
    """Bug 4: C# and C write ``messages/deviceBound``; Node and C# URL-encode the id; Java and C send it raw."""
    device_id = "amqp:enc@dev+1$,x"
    device_with_id(server, device_id)
    encoded = quote(device_id, safe="")
    client = Amqp(server)
    try:
        assert client.put_token(hub_owner_token(server))[0] == 200
        sender = client.devicebound("/messages/deviceBound")  # C#'s link target spelling
        sent = {"csharp": f"/devices/{encoded}/messages/deviceBound",  # WebUtility.UrlEncode(id)
                "node": f"/devices/{encoded}/messages/devicebound",  # encodeURIComponent(id)
                "c": f"/devices/{device_id}/messages/deviceBound"}  # "/devices/%s/messages/deviceBound"
        for sdk, to in sent.items():
            state, cond, description = client.send(sender, Message(address=to, id=f"enc-{sdk}", body=sdk.encode()))
            assert (state, cond) == (Delivery.ACCEPTED, None), (sdk, description)
        assert [r.message_id for r in queued(server, device_id)] == ["enc-csharp", "enc-node", "enc-c"]
        # decoded, the id is still held to the device id rule; the path must still be messages/devicebound
        before = pending_c2d(server)
        for to in ("/devices/amqp%2Fx/messages/devicebound", f"/devices/{encoded}/messages/deviceBound/x",
                   f"/devices/{encoded}/Messages/Events", "/devices/%20/messages/devicebound"):
            assert client.send(sender, Message(address=to, body=b"x"))[:2] == (Delivery.REJECTED,
                                                                                "amqp:invalid-field"), to
        assert pending_c2d(server) == before
    finally:
        client.close()


def test_feedback_and_file_notification_receivers_attach_once_authorised_and_stay_idle(server):
    """Bug 5: C#'s ServiceClient.OpenAsync and C's IoTHubMessaging_LL_Open attach the feedback receiver before
    sending; refusing it broke both. Served idle (no feedback is recorded); other nodes are still refused."""
    sas_device(server, "amqp-feedback-dev")
    port = server.url.rsplit(":", 1)[1]
    client = Amqp(server)
    try:
        with pytest.raises(LinkDetached) as refused:  # not before a token
            client.conn.create_receiver("/messages/serviceBound/feedback")
        assert "amqp:unauthorized-access" in str(refused.value)
        assert client.put_token(hub_owner_token(server))[0] == 200
        feedback = client.conn.create_receiver("/messages/serviceBound/feedback")  # C#
        c_feedback = client.conn.create_receiver(f"amqps://localhost:{port}/messages/servicebound/feedback")  # C
        notifications = client.conn.create_receiver("/messages/serviceBound/filenotifications")  # Java
        state, cond, _ = client.send(client.devicebound(), c2d("amqp-feedback-dev", properties={"iothub-ack": "full"}))
        assert (state, cond) == (Delivery.ACCEPTED, None)
        for receiver in (feedback, c_feedback, notifications):
            with pytest.raises(Timeout):
                receiver.receive(timeout=0.5)
        for attach, address in ((client.conn.create_receiver, "/messages/serviceBound/other"),
                                (client.conn.create_receiver, "/messages/devicebound"),
                                (client.conn.create_sender, "/messages/serviceBound/feedback")):
            with pytest.raises(LinkDetached) as refused:
                attach(address)
            assert "amqp:not-found" in str(refused.value), address
    finally:
        client.close()


# the C service SDK's SASL PLAIN authcid: {keyName}@sas.root.{hubName} (the host name's first label)
C_SDK_USER = "iothubowner@sas.root.localhost"


def test_sasl_plain_authorises_the_connection_as_a_put_token_does(server):
    """Bug 6: the C service SDK's whole flow — SASL PLAIN with a SAS token (no CBS), the feedback receiver, then
    a message to ``deviceBound``. The DPS owner's token speaks for the default hub here too."""
    sas_device(server, "amqp-plain-dev")
    for token in (hub_owner_token(server), dps_owner_token(server)):
        client = Amqp(server, plain=(C_SDK_USER, token))
        try:
            client.conn.create_receiver("amqps://localhost/messages/servicebound/feedback")
            sender = client.devicebound("amqps://localhost/messages/deviceBound")
            state, cond, description = client.send(sender, Message(
                address="/devices/amqp-plain-dev/messages/deviceBound", body=b"from C"))
            assert (state, cond) == (Delivery.ACCEPTED, None), description
            assert client.put_token(hub_owner_token(server))[0] == 200  # CBS still renews on such a connection
        finally:
            client.close()
    assert [r.body for r in queued(server, "amqp-plain-dev")] == [b"from C", b"from C"]


def _server_log(server) -> str:
    return (server.data_dir.parent / "server.log").read_text(errors="replace")


@pytest.mark.parametrize("case", ["bad-signature", "expired", "foreign-audience", "other-dps-policy", "malformed"])
def test_a_refused_sasl_plain_token_closes_the_connection_and_is_not_logged(server, case):
    secret = f"amqp-plain-secret-{case}"
    if case == "other-dps-policy":  # hub_service_only, as for a put-token
        with svc(server) as c:
            r = c.put(f"/accessPolicies/amqp-plain-{case}", json={"rights": "ServiceConfig"})
            assert r.status_code in (200, 201), r.text
            key = c.get(f"/accessPolicies/amqp-plain-{case}/keys").json()["primaryKey"]
        host = sas.parse_connection_string(server.connection_string)["HostName"]
        token = sas.generate(host, key, f"amqp-plain-{case}")
    elif case == "malformed":
        token = f"SharedAccessSignature sr=localhost&{secret}&se=1&skn=iothubowner"
    else:
        token = {"bad-signature": lambda: hub_owner_token(server, key="d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXkh"),
                 "expired": lambda: hub_owner_token(server, ttl=-3600),
                 "foreign-audience": lambda: hub_owner_token(server, host="hub.example.com")}[case]()
    before = pending_c2d(server)
    with pytest.raises(ConnectionException) as refused:
        Amqp(server, plain=(C_SDK_USER, token), timeout=10)
    assert "unauthorized-access" in str(refused.value) or "Authentication failed" in str(refused.value)
    assert pending_c2d(server) == before
    log = _server_log(server)
    assert "SASL PLAIN from" in log
    signature = sas.parse(token).signature if case != "malformed" else secret
    assert signature not in log and quote(signature, safe="") not in log and secret not in log


def _sasl_frame(code: int, fields) -> bytes:
    """A SASL frame as a client writes it (encoded with proton's Data, independently of the server's code)."""
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(code)
    data.put_list()
    data.enter()
    fields(data)
    data.exit()
    data.exit()
    body = bytes(data.encode())
    return (8 + len(body)).to_bytes(4, "big") + b"\x02\x01\x00\x00" + body


def _read(sock: ssl.SSLSocket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"closed after {out!r}"
        out += chunk
    return out


def _read_sasl_frame(sock: ssl.SSLSocket) -> tuple[int, list]:
    size = int.from_bytes(_read(sock, 4), "big")
    rest = _read(sock, size - 4)
    data = Data()
    data.decode(rest[rest[0] * 4 - 4:])
    data.rewind()
    data.next()
    frame = data.get_object()
    return int(frame.descriptor), list(frame.value)


def _plain_init(user: str, password: str):
    def fields(data: Data) -> None:
        data.put_symbol(symbol("PLAIN"))
        data.put_binary(b"\0" + user.encode() + b"\0" + password.encode())
    return fields


@pytest.mark.parametrize("good", [False, True])
def test_sasl_plain_on_the_wire(server, good):
    """The mechanisms offered, the outcome code (1 = auth) and the close, seen as raw frames; an accepted
    client may pipeline its AMQP header behind the sasl-init (held until the token is judged)."""
    token = hub_owner_token(server) if good else hub_owner_token(server, ttl=-3600)
    with _tls(server) as s:
        s.sendall(b"AMQP\x03\x01\x00\x00")
        assert _read(s, 8) == b"AMQP\x03\x01\x00\x00"
        code, fields = _read_sasl_frame(s)
        assert code == 0x40 and list(fields[0].elements) == [symbol("MSSBCBS"), symbol("PLAIN"), symbol("ANONYMOUS")]
        s.sendall(_sasl_frame(0x41, _plain_init(C_SDK_USER, token)) + b"AMQP\x00\x01\x00\x00")
        code, fields = _read_sasl_frame(s)
        assert code == 0x44 and fields[0] == (0 if good else 1)
        if good:
            assert _read(s, 8) == b"AMQP\x00\x01\x00\x00"  # AMQP proper follows
        else:
            assert _closed_within(s, 5)


def _tls(server) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(server.ca_file))
    sock = socket.create_connection(("127.0.0.1", server.amqp_port), timeout=30)
    return ctx.wrap_socket(sock, server_hostname="localhost")


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection (EOF or reset) within ``seconds``; reads what it sends."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        sock.settimeout(max(0.1, deadline - time.time()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except (ConnectionResetError, ssl.SSLError, ssl.SSLEOFError):
            return True
    return False


def test_garbage_and_silent_clients_are_disconnected(server):
    if server.db_url.startswith("postgresql"):
        pytest.skip("the listener's deadlines do not touch the store: checked once, on the SQLite server")
    with _tls(server) as s:  # not AMQP inside TLS
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert _closed_within(s, 10)
    with _tls(server) as s:  # the SASL header, then a frame over the 64 KiB frame limit
        s.sendall(b"AMQP\x03\x01\x00\x00" + (1 << 20).to_bytes(4, "big") + b"\x02\x01\x00\x00" + b"\x00" * 4096)
        assert _closed_within(s, 5)
    with socket.create_connection(("127.0.0.1", server.amqp_port), timeout=30) as s:  # no TLS at all
        s.sendall(b"AMQP\x00\x01\x00\x00")
        assert _closed_within(s, 15)
    with _tls(server) as s:  # TLS, then silence: SASL never finishes
        started = time.time()
        assert _closed_within(s, 20)
        assert time.time() - started >= 5  # closed by the open deadline, not at once
    # the listener still serves a well-behaved client
    client = Amqp(server)
    try:
        assert client.put_token(hub_owner_token(server))[0] == 200
    finally:
        client.close()


def test_one_hubs_key_does_not_sign_for_another_hub(server):
    """Issue 12.3: each hub has its own iothubowner keys, checked on REST and on AMQP CBS alike."""
    with svc(server) as c:
        assert c.put("/linkedHubs/keyed-hub", json={}).status_code == 201
        keys = c.get("/linkedHubs/keyed-hub/keys").json()
    port = server.url.rsplit(":", 1)[1]
    default_key = sas.parse_connection_string(json.loads(server.cli("hub", "connection-string", "show",
                                                                     check=True).stdout)["connectionString"])
    borrowed = sas.generate(f"keyed-hub.localhost:{port}", default_key["SharedAccessKey"], "iothubowner")
    own = sas.generate(f"keyed-hub.localhost:{port}", keys["primaryKey"], "iothubowner")
    import httpx

    verify = ssl.create_default_context(cafile=server.ca_file)
    assert httpx.get(f"{server.url}/devices", headers={"Authorization": borrowed}, verify=verify).status_code == 401
    assert httpx.get(f"{server.url}/devices", headers={"Authorization": own}, verify=verify).status_code == 200
    client = Amqp(server)
    try:
        assert client.put_token(borrowed)[0] == 401
        assert client.put_token(own)[0] == 200
    finally:
        client.close()
    # renewing the key retires the old one at once
    with svc(server) as c:
        renewed = c.post("/linkedHubs/keyed-hub/keys/renew", json={"renewKey": "primary"}).json()
    assert renewed["primaryKey"] != keys["primaryKey"] and renewed["secondaryKey"] == keys["secondaryKey"]
    assert httpx.get(f"{server.url}/devices", headers={"Authorization": own}, verify=verify).status_code == 401


def test_only_the_dps_owner_policy_speaks_for_a_hub_over_cbs(server):
    """Issue 12.18: another DPS access policy, even one with ServiceConfig, is refused at put-token (as on the
    REST hub routes); the owner policy still speaks for the default hub."""
    with svc(server) as c:
        assert c.put("/accessPolicies/amqp-config", json={"rights": "ServiceConfig"}).status_code == 201
        key = c.get("/accessPolicies/amqp-config/keys").json()["primaryKey"]
    host = sas.parse_connection_string(server.connection_string)["HostName"]
    client = Amqp(server)
    try:
        status, description = client.put_token(sas.generate(host, key, "amqp-config"))
        assert status == 401 and "may not use the hub service API" in description, description
        assert client.put_token(dps_owner_token(server))[0] == 200
    finally:
        client.close()


def test_a_client_without_sasl_is_served_and_cbs_still_decides(server):
    """Issue 12.20: the plain AMQP header (no SASL layer, as Microsoft's Node service SDK sends) is accepted;
    CBS put-token still authorises every devicebound link."""
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(str(server.ca_file))
    domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
    client = Amqp.__new__(Amqp)
    client.conn = BlockingConnection(f"amqps://localhost:{server.amqp_port}", ssl_domain=domain, sasl_enabled=False,
                                     timeout=20)
    client.next_id, client.cbs = 1, None
    try:
        with pytest.raises(LinkDetached):  # no token yet: the devicebound link is refused
            client.devicebound()
        assert client.put_token("SharedAccessSignature sr=localhost&sig=bad&se=1&skn=iothubowner")[0] == 401
        assert client.put_token(hub_owner_token(server))[0] == 200
        sas_device(server, "amqp-nosasl-dev")
        state, cond, description = client.send(client.devicebound(), c2d("amqp-nosasl-dev"))
        assert state == Delivery.ACCEPTED, (cond, description)
    finally:
        client.close()
