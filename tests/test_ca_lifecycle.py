"""PKI lifecycle operations while devices register: rotation and issuing-CA revocation against a live server."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives.serialization import Encoding
from tests.test_device_api import (
    chain_from,
    csr_b64,
    device,
    device_sas,
    namespace,
    openssl_verify_chain,
    register,
    svc,
    sym_key,
)

from opendps.pki import thumbprint


class _HeldWebhook(BaseHTTPRequestHandler):
    """A custom allocation webhook that answers only once the test lets it (the operator acts meanwhile)."""

    arrived = threading.Event()
    release = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).arrived.set()
        type(self).release.wait(30)
        data = json.dumps({"iotHubHostName": "localhost"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_rotation_and_revocation_while_a_registration_is_being_decided(server, tmp_path):
    """The operator rotates the policy and revokes the old issuing CA (key compromise) while a registration waits
    for its allocation webhook: the registration must not end with a certificate of the revoked CA."""
    _HeldWebhook.arrived.clear()
    _HeldWebhook.release.clear()
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _HeldWebhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hook.server_address[1]}/allocate"
    base = "/namespaces/lifens/credentials/default/policies/lifepol"
    try:
        with svc(server) as c:
            namespace(c, "lifens", "lifepol")
            custom = {"webhookUrl": url, "apiVersion": "2021-10-01", "timeoutInSeconds": 30}
            key = sym_key(c, "/enrollments/life-dev", {
                "attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
                "customAllocationDefinition": custom, "credentialPolicyName": "lifepol"})
        auth = {"Authorization": device_sas(server.id_scope, "life-dev", key)}
        body = {"registrationId": "life-dev", "csr": csr_b64(tmp_path, "life-dev")}
        with device(server) as d, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(register, server, d, "life-dev", headers=auth, body=body)
            assert _HeldWebhook.arrived.wait(30)
            with svc(server) as c:
                r = c.post(f"{base}/rotate")
                assert r.status_code == 200, r.text
                cas = c.get(f"{base}/issuingCas").json()["value"]
                retired = [ca for ca in cas if ca["status"] == "retired"]
                assert len(retired) == 1
                r = c.post(f"{base}/issuingCas/{retired[0]['serialNumber']}/revoke", json={"reason": "keyCompromise"})
                assert r.status_code == 200, r.text
            _HeldWebhook.release.set()
            # never a certificate of the CA revoked meanwhile: what was signed with it is not kept, and the
            # registration is decided again (the webhook asked again) and signed by the new CA, in this answer
            r, result = pending.result(60)
        assert result is not None and result["status"] == "assigned", r.text
        chain = chain_from(result["registrationState"])
        with svc(server) as c:
            active = [ca for ca in c.get(f"{base}/issuingCas").json()["value"] if ca["status"] == "active"]
            assert thumbprint(chain[1]) == active[0]["thumbprint"]
            root = c.get("/namespaces/lifens/credentials/default").json()
            issued = c.get("/deviceCertificates", params={"deviceId": "life-dev"}).json()["value"]
        assert [i["serialNumber"] for i in issued] == [format(chain[0].serial_number, "X").zfill(32)]
        assert root["properties"]["certificate"].strip() == \
            chain[2].public_bytes(Encoding.PEM).decode().strip()
        openssl_verify_chain(tmp_path, chain)  # to the namespace root the device trusts
    finally:
        hook.shutdown()
