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
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote

import pytest
from cproton import ffi, lib
from proton import ConnectionException, Data, Delivery, Endpoint, Message, SSLDomain, Timeout, int32, symbol, ulong
from proton.utils import BlockingConnection, LinkDetached
from sqlalchemy import select
from tests.test_device_api import svc
from tests.test_mqtt_hub import HUB, Client, hub_username, pending_c2d

from opendps.store import CloudToDeviceMessage, LinkedHub, Store
from opendps.store.models import CloudToDeviceFeedback
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


def test_feedback_and_file_notification_receivers_attach_once_authorised(server):
    """Bug 5: C#'s ServiceClient.OpenAsync and C's IoTHubMessaging_LL_Open attach the feedback receiver before
    sending; refusing it broke both. File notifications stay idle (no file upload); other nodes are still refused.
    A message the device has not acknowledged has no feedback yet (the feedback itself:
    test_c2d_feedback_reaches_a_receiver_that_completes_it)."""
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
        assert feedback.link.state & c_feedback.link.state & Endpoint.REMOTE_ACTIVE
        with pytest.raises(Timeout):
            notifications.receive(timeout=0.5)
        for attach, address in ((client.conn.create_receiver, "/messages/serviceBound/other"),
                                (client.conn.create_receiver, "/messages/devicebound"),
                                (client.conn.create_sender, "/messages/serviceBound/feedback")):
            with pytest.raises(LinkDetached) as refused:
                attach(address)
            assert "amqp:not-found" in str(refused.value), address
    finally:
        client.close()


def _feedback_for(receiver, message_id: str, timeout: float = 20):
    """The next feedback message holding ``message_id``'s record, accepting (completing) any other batch on the way
    (earlier tests' outcomes); (message, its delivery tag, its records)."""
    deadline = time.time() + timeout
    while True:
        message = receiver.receive(timeout=max(0.1, deadline - time.time()))
        records = json.loads(bytes(message.body))
        if any(r["originalMessageId"] == message_id for r in records):
            delivery = receiver.fetcher.unsettled[-1]._impl  # its tag raw: proton's Delivery.tag decodes UTF-8
            return message, ffi.unpack(lib.pn_delivery_tag(delivery).start, lib.pn_delivery_tag(delivery).size), records
        receiver.accept()


def test_c2d_feedback_reaches_a_receiver_that_completes_it(server):
    """IoT Hub's message feedback (C#'s FeedbackReceiver, Node's getFeedbackReceiver): a message sent with
    ``iothub-ack: full`` that the device acknowledges gets a Success record on ``/messages/servicebound/feedback``,
    in IoT Hub's shape (content type, user-id, ``iothub-enqueuedtime``, a GUID-sized delivery tag, JSON records); one
    sent without an ack gets none. Released it comes again; accepted it is gone; left unsettled when its connection
    ends it goes to the next receiver. Before, the link was served idle: every feedback receive timed out."""
    key = sas_device(server, "amqp-fb-dev")
    client = Amqp(server)
    try:
        assert client.put_token(hub_owner_token(server))[0] == 200
        sender = client.devicebound()
        for mid, ack in (("fb-full", "full"), ("fb-quiet", None), ("fb-again", "positive")):
            props = {"iothub-ack": ack} if ack else {}
            assert client.send(sender, c2d("amqp-fb-dev", id=mid, properties=props))[0] == Delivery.ACCEPTED
        device = Client(server, "amqp-fb-dev", hub_username("amqp-fb-dev"),
                        password=sas.generate(f"{HUB}/devices/amqp-fb-dev", key))
        try:
            device.subscribe("devices/amqp-fb-dev/messages/devicebound/#")
            for _ in range(3):  # paho acknowledges each (PUBACK): the device completed them
                device.expect("devices/amqp-fb-dev/messages/devicebound/")
        finally:
            device.close()
        receiver = client.conn.create_receiver("/messages/serviceBound/feedback")
        message, tag, records = _feedback_for(receiver, "fb-full")
        assert message.content_type == "application/vnd.microsoft.iothub.feedback.json"
        assert bytes(message.user_id) == b"default" and len(tag) == 16
        assert abs(message.annotations[symbol("iothub-enqueuedtime")] / 1000 - time.time()) < 60
        mine = {r["originalMessageId"]: r for r in records if r["deviceId"] == "amqp-fb-dev"}
        assert set(mine) == {"fb-full", "fb-again"}  # not the one sent without an ack
        assert mine["fb-full"]["statusCode"] == "Success" and mine["fb-full"]["description"] == "Success"
        assert mine["fb-full"]["deviceGenerationId"] and mine["fb-full"]["enqueuedTimeUtc"].endswith("Z")
        receiver.release()  # abandoned: delivered again
        again, _, records = _feedback_for(receiver, "fb-full")
        assert {r["originalMessageId"] for r in records} >= {"fb-full", "fb-again"}
        receiver.accept()  # completed: gone
        with pytest.raises(Timeout):
            receiver.receive(timeout=2.5)
        assert client.send(sender, c2d("amqp-fb-dev", id="fb-unsettled", properties={"iothub-ack": "full"}))[0] \
            == Delivery.ACCEPTED
        device = Client(server, "amqp-fb-dev", hub_username("amqp-fb-dev"),
                        password=sas.generate(f"{HUB}/devices/amqp-fb-dev", key))
        try:
            device.subscribe("devices/amqp-fb-dev/messages/devicebound/#")
            device.expect("devices/amqp-fb-dev/messages/devicebound/")
        finally:
            device.close()
        _feedback_for(receiver, "fb-unsettled")  # received, never settled: the connection ends
    finally:
        client.close()
    later = Amqp(server)
    try:
        assert later.put_token(hub_owner_token(server))[0] == 200
        receiver = later.conn.create_receiver("/messages/serviceBound/feedback")
        _, _, records = _feedback_for(receiver, "fb-unsettled")
        assert [r["statusCode"] for r in records if r["originalMessageId"] == "fb-unsettled"] == ["Success"]
        receiver.accept()
    finally:
        later.close()


def test_a_receiver_that_releases_every_feedback_batch_does_not_spin_the_server(server):
    """A receiver that answers each feedback batch with released (C#'s AbandonAsync in a loop, Node's abandon or
    reject) got the same batch back at once, forever: every turn a claim and an abandon written to the store, as
    fast as the connection went — hundreds a second of write-lock traffic on SQLite from one client, taken from the
    devices. A batch it did not complete now comes again no sooner than the feedback poll (1 s) on that link."""
    store = Store(server.db_url)
    try:
        with store.session() as s:
            hub_id = s.scalar(select(LinkedHub.id).where(LinkedHub.name == "default"))
            now = datetime.now(UTC)
            s.add(CloudToDeviceFeedback(hub_id=hub_id, device_id="fb-spin", generation_id="g", message_id="fb-spin",
                                        status="Success", enqueued_at=now, expires_at=now + timedelta(hours=1)))
    finally:
        store.dispose()
    client = Amqp(server)
    try:
        assert client.put_token(hub_owner_token(server))[0] == 200
        receiver = client.conn.create_receiver("/messages/serviceBound/feedback")
        _feedback_for(receiver, "fb-spin")
        deliveries, deadline = 1, time.monotonic() + 1.5
        while time.monotonic() < deadline:
            receiver.release()
            try:
                receiver.receive(timeout=max(0.05, deadline - time.monotonic()))
            except Timeout:
                receiver.receive(timeout=5)  # it does come again
            deliveries += 1
        assert deliveries <= 4, f"{deliveries} deliveries of a released batch in 1.5 s"
        receiver.accept()  # completed: gone, and later tests' receivers do not see it
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


def test_c2d_without_content_type_or_encoding_stores_neither(server):
    """Found by fuzzing: proton reads an absent content-type as the text 'None', which was queued and sent to the device
    as ``$.ct=None&$.ce=None``."""
    sas_device(server, "amqp-no-ct-dev")
    client = Amqp(server)
    try:
        assert client.put_token(hub_owner_token(server))[0] == 200
        assert client.send(client.devicebound(), c2d("amqp-no-ct-dev", id="no-ct"))[:2] == (Delivery.ACCEPTED, None)
    finally:
        client.close()
    [row] = queued(server, "amqp-no-ct-dev")
    assert row.system_properties == {}


def test_c2d_whose_properties_cannot_fit_an_mqtt_topic_is_refused(server):
    """Found by fuzzing: AMQP takes 256 KB of application properties, but the device receives them in the PUBLISH topic
    (at most 65,535 bytes); such a message was queued, then failed every delivery with a traceback and held back every
    message queued after it."""
    sas_device(server, "amqp-big-props-dev")
    client = Amqp(server)
    try:
        assert client.put_token(hub_owner_token(server))[0] == 200
        sender = client.devicebound()
        state, cond, description = client.send(sender, c2d("amqp-big-props-dev", properties={"k": "v" * 70000}))
        assert (state, cond) == (Delivery.REJECTED, "amqp:link:message-size-exceeded"), description
        assert "properties" in description
        assert client.send(sender, c2d("amqp-big-props-dev", properties={"k": "v" * 60000}))[:2] == (
            Delivery.ACCEPTED, None)
    finally:
        client.close()
    assert [len(r.properties["k"]) for r in queued(server, "amqp-big-props-dev")] == [60000]


def _encode(data: Data, value) -> None:
    """A performative's fields: ("described", code, value) tuples, lists, else proton's own mapping of the value."""
    if isinstance(value, tuple) and value[:1] == ("described",):
        data.put_described()
        data.enter()
        data.put_ulong(value[1])
        _encode(data, value[2])
        data.exit()
    elif isinstance(value, list):
        data.put_list()
        data.enter()
        for item in value:
            _encode(data, item)
        data.exit()
    else:
        data.put_object(value)


def _perf(code: int, fields: list, payload: bytes = b"", channel: int = 0) -> bytes:
    """An AMQP frame (type 0) carrying the performative ``code`` and, for a transfer, the message bytes."""
    data = Data()
    _encode(data, ("described", code, fields))
    body = bytes(data.encode()) + payload
    return (8 + len(body)).to_bytes(4, "big") + b"\x02\x00" + channel.to_bytes(2, "big") + body


OPEN, BEGIN, ATTACH, FLOW, TRANSFER = 0x10, 0x11, 0x12, 0x13, 0x14


def _attach(name: str, handle: int, receiver: bool, source: str, target: str) -> bytes:
    from proton import ubyte, uint
    return _perf(ATTACH, [name, uint(handle), receiver, ubyte(0), ubyte(0), ("described", 0x28, [source]),
                          ("described", 0x29, [target])])


def _transfer(handle: int, delivery_id: int, payload: bytes, *, more: bool = False, aborted: bool = False) -> bytes:
    from proton import uint
    fields = [uint(handle), uint(delivery_id), str(delivery_id).encode(), uint(0), False, more]
    return _perf(TRANSFER, fields + ([None, None, None, True] if aborted else []), payload)


def _read_all(sock: ssl.SSLSocket, seconds: float) -> bytes:
    """What the server sends within ``seconds`` (less if it closes)."""
    out, deadline = b"", time.time() + seconds
    while time.time() < deadline:
        sock.settimeout(max(0.05, deadline - time.time()))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ssl.SSLError, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
    return out


def _frames(sock: ssl.SSLSocket, seconds: float = 2.0) -> list[tuple[int, list]]:
    """The performatives the server sends within ``seconds``: (code, fields)."""
    out = _read_all(sock, seconds)
    frames = []
    while len(out) >= 8:
        if out.startswith(b"AMQP"):
            out = out[8:]
            continue
        size = int.from_bytes(out[:4], "big")
        body, out = out[out[4] * 4:size], out[size:]
        if body:
            data = Data()
            data.decode(body)
            data.rewind()
            data.next()
            performative = data.get_object()
            frames.append((int(performative.descriptor), list(performative.value)))
    return frames


def _raw_amqp(server, idle_timeout_ms: int = 0) -> ssl.SSLSocket:
    """TLS, SASL ANONYMOUS, the AMQP header and an open; the server's answers so far are read."""
    from proton import uint, ushort
    sock = _tls(server)
    sock.sendall(SASL_HEADER_BYTES + _sasl_frame(0x41, lambda d: d.put_symbol(symbol("ANONYMOUS"))) + AMQP_HEADER_BYTES
                 + _perf(OPEN, ["fuzz", "localhost", uint(65536), ushort(7)] + ([uint(idle_timeout_ms)] if idle_timeout_ms
                                                                                  else [])))
    return sock


SASL_HEADER_BYTES, AMQP_HEADER_BYTES = b"AMQP\x03\x01\x00\x00", b"AMQP\x00\x01\x00\x00"


def test_a_tiny_idle_timeout_is_refused(server):
    """Found by fuzzing: an open with idle-timeout 1 ms made the server send an empty frame every 0.5 ms (23,000 a
    second, half a core per connection). Now the open is answered with close(amqp:invalid-field)."""
    with _raw_amqp(server, idle_timeout_ms=1) as s:
        frames = _frames(s, 3)
    closes = [f for code, f in frames if code == 0x18]
    assert closes and "amqp:invalid-field" in str(closes[0]) and "idle-timeout" in str(closes[0]), frames
    assert len(frames) < 10, len(frames)


def test_malformed_attaches_and_transfers_are_refused_by_amqp_errors(server):
    """Found by fuzzing, each a traceback in the server log: a link address that is not UTF-8 (the connection was
    dropped), a message whose 'to' is not UTF-8 or whose application-properties are a list (internal-error), an
    aborted transfer (the connection was dropped). Also: transfers past the link credit were all taken (each a queued
    handler call), now the link is detached with amqp:link:transfer-limit-exceeded."""
    from proton import uint, ulong
    sas_device(server, "amqp-raw-dev")
    before = len(_server_log(server))
    good = Message(address="/devices/amqp-raw-dev/messages/devicebound", body=b"ok").encode()
    put_token = Message(id=ulong(1), body=hub_owner_token(server), properties={
        "operation": "put-token", "type": SAS_TYPE, "name": "x"}).encode()
    with _raw_amqp(server) as s:
        s.sendall(_perf(BEGIN, [None, uint(0), uint(1000), uint(1000)]) + _attach("cs", 0, False, "me", "$cbs")
                  + _attach("cr", 1, True, "$cbs", "me")
                  + _perf(FLOW, [uint(0), uint(1000), uint(0), uint(1000), uint(1), uint(0), uint(10)]))
        _frames(s, 1)
        s.sendall(_transfer(0, 0, put_token) + _attach("d", 2, False, "me", "/messages/devicebound")
                  # a target address that is not UTF-8
                  + _attach("bad", 3, False, "me", "/messages/XX").replace(b"/messages/XX", b"/messages/\xed\xa0"))
        frames = _frames(s, 1.5)
        detached = [f for code, f in frames if code == 0x16]
        assert len(detached) == 1 and detached[0][0] == 3 and "amqp:decode-error" in str(detached[0]), frames
        bad_to = Message(address="/devices/XX/messages/devicebound", body=b"x").encode().replace(b"XX", b"\xed\xa0")
        props_list = Message(address="/devices/amqp-raw-dev/messages/devicebound", body=b"x").encode()
        props_list = props_list.replace(b"\x00Sw", b"\x00St\xc0\x03\x02\x41\x42\x00Sw", 1)  # a list [true, false]
        s.sendall(_transfer(2, 1, bad_to) + _transfer(2, 2, props_list)
                  + _transfer(2, 3, good[:5], more=True) + _transfer(2, 3, b"", aborted=True) + _transfer(2, 4, good))
        frames = _frames(s, 2)
        outcomes = {f[1]: str(f) for code, f in frames if code == 0x15}
        assert "amqp:decode-error" in outcomes[1] and "amqp:decode-error" in outcomes[2], frames
        assert 3 not in outcomes and "ulong(36)" in outcomes[4], frames  # aborted: no outcome; the next is accepted
        # 10 deliveries of credit; an 11th without waiting for more
        s.sendall(b"".join(_transfer(2, 5 + n, good) for n in range(11)))
        frames = _frames(s, 3)
        assert any(code == 0x16 and "amqp:link:transfer-limit-exceeded" in str(f) for code, f in frames), frames
    assert [r.body for r in queued(server, "amqp-raw-dev")][:1] == [b"ok"]
    log = _server_log(server)[before:]
    assert "Traceback" not in log and "internal" not in log, log[-3000:]
