"""Hub rules in-process: host names, unlinking, the CAs a hub trusts, and who may open a device session."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tests.unit.conftest import creds, register, statements_run, symmetric_group
from tests.x509_helpers import make_ca, make_leaf, p384_csr

from opendps.errors import Conflict, InvalidCredentials, InvalidInput, Unauthorized
from opendps.hub.registry import HubTrust
from opendps.pki import serial_hex, thumbprint
from opendps.transport import sas
from opendps.transport.sas import derive_device_key

PREVIEW = "2025-07-01-preview"


def test_a_hub_without_a_host_name_gets_one_under_the_service_domain(services):
    assert services.hubs.create("east").host_name == "east.hubs.test"
    with pytest.raises(Conflict, match="already exists"):
        services.hubs.create("east", "other.hubs.test")


def test_a_hub_named_by_an_enrollment_cannot_be_unlinked(services):
    services.hubs.create("east")
    symmetric_group(services, "uses-east", iotHubs=["east"])
    with pytest.raises(Conflict, match="used by enrollment.s. uses-east") as info:
        services.hubs.delete("east")
    assert info.value.error_code == 409002
    services.enrollments.delete("group", "uses-east")
    services.hubs.delete("east")
    assert [h.name for h in services.hubs.list()] == ["default"]


def test_trust_follows_policy_links_and_rotation(services):
    services.registry.create_namespace("sync-ns", "sync-p")
    services.hubs.create("sync", apply_allocation_policy=False)
    first = services.registry.get_policy("sync-ns", "sync-p").issuing_ca
    assert services.hubs.trusted_cas("sync") == []
    symmetric_group(services, "sync-group", credentialPolicyName="sync-p", iotHubs=["sync"])
    assert [t.certificate for t in services.hubs.trusted_cas("sync")] == [first]
    second = services.registry.rotate_policy("sync-ns", "sync-p").issuing_ca
    trusted = services.hubs.trusted_cas("sync")
    assert [(t.certificate, t.status, t.enrollments) for t in trusted] == [
        (first, "retired", ["sync-group"]), (second, "active", ["sync-group"])]
    assert services.hubs.trusted_cas("default") == []  # the group names only "sync"
    symmetric_group(services, "everywhere", credentialPolicyName="sync-p")  # no hubs: every hub that applies allocation
    assert [t.certificate for t in services.hubs.trusted_cas("default")] == [first, second]
    assert services.hubs.trusted_cas("sync")[0].enrollments == ["sync-group"]


@pytest.fixture
def provisioned(services):
    """Two devices of one group, each with an operational certificate from the group's policy."""
    services.registry.create_namespace("hub-ns", "ops")
    key = symmetric_group(services, "hub-group", credentialPolicyName="ops")
    chains = {}
    for rid in ("dev-h1", "dev-h2"):
        state = register(services, creds(rid, key=derive_device_key(key, rid)), csr=base64.b64encode(p384_csr(rid)).decode(),
                         api_version=PREVIEW)["registrationState"]
        chains[rid] = [x509.load_der_x509_certificate(base64.b64decode(d)) for d in state["issuedCertificateChain"]]
    return services.hubs.get("default"), chains


def _auth(services, hub, device_id, *, password=None, chain=(), client_id=None, now=None):
    return services.hub_auth.authenticate(hub, device_id, client_id or device_id, password, list(chain),
                                          now or datetime.now(UTC))


def test_an_operational_certificate_opens_only_its_own_device(services, provisioned):
    hub, chains = provisioned
    device = _auth(services, hub, "dev-h1", chain=chains["dev-h1"][:2])
    assert (device.device_id, device.auth_type, device.certificate_serial) == (
        "dev-h1", "certificateAuthority", serial_hex(chains["dev-h1"][0]))
    # what live sessions match a revocation of its issuing CA on: that CA's own key identifier
    issuing_ca = chains["dev-h1"][1]
    assert device.issuer_key_id == issuing_ca.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest.hex()
    with pytest.raises(Unauthorized, match="certificate CN 'dev-h2' is not the device id 'dev-h1'"):
        _auth(services, hub, "dev-h1", chain=chains["dev-h2"][:2])
    with pytest.raises(Unauthorized, match="expired or not yet valid"):
        _auth(services, hub, "dev-h1", chain=chains["dev-h1"][:2], now=datetime.now(UTC) + timedelta(days=365))
    with pytest.raises(InvalidInput, match="client id 'other' is not the device id"):
        _auth(services, hub, "dev-h1", chain=chains["dev-h1"][:2], client_id="other")
    stranger = make_ca("stranger")
    leaf, _ = make_leaf("dev-h1", stranger)
    with pytest.raises(Unauthorized, match="not issued by a CA this hub trusts"):
        _auth(services, hub, "dev-h1", chain=[leaf, stranger.cert])
    with pytest.raises(InvalidCredentials, match="no credential"):
        _auth(services, hub, "dev-h1")


def test_our_certificate_is_known_by_its_record_and_the_hub_trusting_its_issuer(services, provisioned, monkeypatch):
    """A certificate opendps issued is recognised by its issuance record (the same DER) under an issuing CA the hub
    trusts, without path-validating its chain again; anything else (a look-alike not signed by us, a certificate of
    ours at a hub that does not trust its CA) still meets the verifier."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from opendps.hub.registry import HubTrust

    hub, chains = provisioned
    genuine, issuing_ca = chains["dev-h1"][:2]
    # the same fields, our CA's name and key identifier, the genuine public key: signed by another key
    impostor = ec.generate_private_key(ec.SECP384R1())
    builder = (x509.CertificateBuilder().subject_name(genuine.subject).issuer_name(genuine.issuer)
               .public_key(genuine.public_key()).serial_number(genuine.serial_number)
               .not_valid_before(genuine.not_valid_before_utc).not_valid_after(genuine.not_valid_after_utc))
    for ext in genuine.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    look_alike = builder.sign(impostor, hashes.SHA384())
    with pytest.raises(Unauthorized, match="not issued by a CA this hub trusts") as info:
        _auth(services, hub, "dev-h1", chain=[look_alike, issuing_ca])
    assert info.value.reason == "untrusted_certificate"
    # a hub that trusts no CA of this policy (no enrollment sends devices there): refused though the record exists
    services.hubs.create("east", apply_allocation_policy=False)
    services.hubs.create_device("east", "dev-h1", auth_type="certificateAuthority")
    with pytest.raises(Unauthorized, match="hub 'east' trusts no CA"):
        _connect(services, "dev-h1", chain=[genuine, issuing_ca], host="east.hubs.test")

    def no_path_validation(self, now):
        raise AssertionError("our own certificate was path-validated again")

    monkeypatch.setattr(HubTrust, "verifier", no_path_validation)
    assert _auth(services, hub, "dev-h1", chain=[genuine, issuing_ca]).device_id == "dev-h1"
    assert _auth(services, hub, "dev-h1", chain=[genuine]).device_id == "dev-h1"  # no chain sent: the same


def test_a_disabled_or_unknown_device_is_refused(services, provisioned):
    hub, chains = provisioned
    services.hubs.create_device("default", "dev-h1", auth_type="certificateAuthority", status="disabled")
    with pytest.raises(Unauthorized, match="is disabled"):
        _auth(services, hub, "dev-h1", chain=chains["dev-h1"][:2])
    with pytest.raises(Unauthorized, match="does not exist in hub 'default'"):
        _auth(services, hub, "nobody", chain=chains["dev-h2"][:2])


def test_sas_and_self_signed_devices(services):
    hub = services.hubs.get("default")
    ident, _ = services.hubs.create_device("default", "sas-dev")
    _, keys = services.hubs.device_credentials("default", "sas-dev")
    token = sas.generate(f"{hub.host_name}/devices/sas-dev", keys[1])
    assert _auth(services, hub, "sas-dev", password=token.encode()).auth_type == "sas"
    for bad, words in ((sas.generate(f"{hub.host_name}/devices/other", keys[0]), "does not name"),
                       (sas.generate(f"{hub.host_name}/devices/sas-dev", keys[0], ttl=-3600), "expired"),
                       (sas.generate(f"{hub.host_name}/devices/sas-dev", base64.b64encode(b"k" * 32).decode()),
                        "does not verify"), ("garbage", "invalid SharedAccessSignature")):
        with pytest.raises(InvalidCredentials, match=words):
            _auth(services, hub, "sas-dev", password=bad.encode())
    cert, _ = make_leaf("self-dev", None)
    services.hubs.create_device("default", "self-dev", auth_type="selfSigned",
                                thumbprints=(thumbprint(cert, "sha1"), None))
    assert _auth(services, hub, "self-dev", chain=[cert]).auth_type == "selfSigned"
    other, _ = make_leaf("self-dev", None)
    with pytest.raises(Unauthorized, match="thumbprint does not match"):
        _auth(services, hub, "self-dev", chain=[other])
    with pytest.raises(InvalidCredentials, match="does not use SAS"):
        _auth(services, hub, "self-dev", password=token.encode())


@pytest.mark.parametrize("bad", ["bad id!", "ünïcode", "a" * 129, "a/b", "../x", "", "tab\tid"])
def test_device_ids_follow_iot_hub_rules(services, bad):
    """Issue 12.8: IoT Hub's device-id alphabet, 1-128 characters."""
    with pytest.raises(InvalidInput, match="device id .* is invalid"):
        services.hubs.create_device("default", bad)
    assert services.hubs.list_devices("default") == []


def test_device_ids_may_use_every_character_iot_hub_allows(services):
    device_id = "Dev-1:.+%_#*?!(),=@;$'" + "x" * 106
    ident, created = services.hubs.create_device("default", device_id)
    assert created and ident.device_id == device_id and len(device_id) == 128


def test_each_hub_has_its_own_owner_keys_and_renews_them(services):
    """Issue 12.3: one hub's key never signs for another; keys renew like az iot hub policy renew-key."""
    services.hubs.create("east")
    default, east = services.hubs.owner_keys("default"), services.hubs.owner_keys("east")
    assert len(set(default + east)) == 4
    assert services.hubs.owner_keys("east") == east  # stable
    renewed = services.hubs.renew_owner_key("east", "primary")
    assert renewed[0] not in east and renewed[1] == east[1]
    assert services.hubs.renew_owner_key("east", "swap") == (renewed[1], renewed[0])
    assert services.hubs.owner_keys("east") == (renewed[1], renewed[0])
    with pytest.raises(InvalidInput, match="renewKey must be primary, secondary or swap"):
        services.hubs.renew_owner_key("east", "both")


def test_a_hub_token_verifies_only_with_its_own_hub_key(services):
    import asyncio

    from opendps.frontends.service_auth import HUB_POLICY, SasAuthenticator

    services.hubs.create("east")

    async def by_host(host: str):
        hub = services.hubs.by_host(host)
        return hub.name if hub else None

    async def keys(hub: str):
        return services.hubs.owner_keys(hub)

    async def no_policy(name: str):
        return None

    auth = SasAuthenticator({"dps.test"}, no_policy, by_host, keys)
    east_host = services.hubs.get("east").host_name
    own = sas.generate(east_host, services.hubs.owner_keys("east")[1], HUB_POLICY)
    assert asyncio.run(auth.authenticate(own)).hub == "east"
    borrowed = sas.generate(east_host, services.hubs.owner_keys("default")[0], HUB_POLICY)
    with pytest.raises(Unauthorized, match="signature"):
        asyncio.run(auth.authenticate(borrowed))


def _connect(services, device_id, *, chain=(), password=None, host="default.hubs.test"):
    return services.hub_auth.connect(host, device_id, device_id, password, list(chain), datetime.now(UTC))


def test_a_connect_is_one_step_whose_cost_does_not_grow_with_the_configuration(services, provisioned):
    """Issue 14: the hub and its trust from the configuration cache; the identity, the issuance record and the
    ADR record in three prepared statements; no enrollment, policy, CA or hub row read."""
    _, chains = provisioned
    _connect(services, "dev-h1", chain=chains["dev-h1"][:2])  # fills the caches
    for i in range(30):  # more enrollments do not add work to a CONNECT
        symmetric_group(services, f"more-{i}", credentialPolicyName="ops")
    _connect(services, "dev-h1", chain=chains["dev-h1"][:2])
    through_sqlalchemy, stop_sqlalchemy = statements_run(services.store, prepared=False)
    prepared, stop = statements_run(services.store)
    from sqlalchemy import event
    checkouts: list[object] = []
    count = lambda *args: checkouts.append(args)  # noqa: E731
    event.listen(services.store.engine, "checkout", count)
    try:
        assert _connect(services, "dev-h1", chain=chains["dev-h1"][:2]).device_id == "dev-h1"
    finally:
        stop()
        stop_sqlalchemy()
        event.remove(services.store.engine, "checkout", count)
    assert through_sqlalchemy == []  # every statement on the driver's cursor (opendps.store.prepared)
    assert len(prepared) == 3, prepared
    assert len(checkouts) == 1  # the configuration counter is read on the statements' connection
    assert [s.split(" FROM ")[1].split()[0] for s in prepared] == ["hub_devices", "issued_certificates",
                                                                   "device_records"]
    with pytest.raises(Unauthorized, match="no linked hub has the host name 'nowhere.test'"):
        _connect(services, "dev-h1", chain=chains["dev-h1"][:2], host="nowhere.test")


def _owner_ca(services, hub: str, name: str):
    """An owner CA uploaded to ``hub`` and proven; returns it and the view to delete it with."""
    owner = make_ca(name)
    certificates = services.hubs.certificates(hub)
    view, _ = certificates.upload(name, owner.pem)
    view = certificates.generate_verification_code(name, if_match=view.etag)
    proof, _ = make_leaf(view.verification_code, owner)
    return owner, certificates.verify(name, proof.public_bytes(Encoding.PEM), if_match=view.etag)


def test_an_owner_ca_device_reconnecting_is_not_path_validated_again(services, monkeypatch):
    """Its chain validated at the first CONNECT is remembered with the hub's trust; a trust change (the CA deleted)
    makes a new trust that remembers nothing, and the device, disabled, is refused though its path is remembered."""
    owner, view = _owner_ca(services, "default", "reconnect owner")
    device, _ = make_leaf("owned-again", owner)
    services.hubs.create_device("default", "owned-again", auth_type="certificateAuthority")
    verified: list[str] = []
    real = HubTrust.verifier

    class Counting:
        def __init__(self, inner) -> None:
            self.inner = inner

        def verify(self, leaf, intermediates):
            verified.append(leaf.subject.rfc4514_string())
            return self.inner.verify(leaf, intermediates)

    monkeypatch.setattr(HubTrust, "verifier", lambda self, now: (v := real(self, now)) and Counting(v))
    for _ in range(3):
        assert _connect(services, "owned-again", chain=[device, owner.cert]).device_id == "owned-again"
    assert verified == ["CN=owned-again"]
    services.hubs.create_device("default", "owned-again", auth_type="certificateAuthority", status="disabled")
    with pytest.raises(Unauthorized, match="is disabled"):
        _connect(services, "owned-again", chain=[device, owner.cert])
    services.hubs.create_device("default", "owned-again", auth_type="certificateAuthority", status="enabled")
    services.hubs.certificates("default").delete("reconnect owner", if_match=view.etag)
    with pytest.raises(Unauthorized, match="hub 'default' trusts no CA"):  # its only CA is gone
        _connect(services, "owned-again", chain=[device, owner.cert])


def test_trust_changes_are_in_force_at_the_next_connect(services, provisioned):
    """Cached trust is keyed on the configuration counter: rotation, a new hub CA and a disabled device need no
    restart and no wait."""
    hub, chains = provisioned
    assert _connect(services, "dev-h1", chain=chains["dev-h1"][:2]).device_id == "dev-h1"
    # the policy's issuing CA is rotated: a certificate from the new one is trusted at once (the old one too)
    services.registry.rotate_policy("hub-ns", "ops")
    key = symmetric_group(services, "hub-group-2", credentialPolicyName="ops")
    state = register(services, creds("dev-h3", key=derive_device_key(key, "dev-h3")),
                     csr=base64.b64encode(p384_csr("dev-h3")).decode(), api_version=PREVIEW)["registrationState"]
    rotated = [x509.load_der_x509_certificate(base64.b64decode(d)) for d in state["issuedCertificateChain"]]
    assert rotated[1] != chains["dev-h1"][1]
    assert _connect(services, "dev-h3", chain=rotated[:2]).device_id == "dev-h3"
    assert _connect(services, "dev-h1", chain=chains["dev-h1"][:2]).device_id == "dev-h1"
    # an owner CA uploaded to the hub and proven: its devices connect at once
    owner = make_ca("owner ca")
    device, _ = make_leaf("owned-1", owner)
    services.hubs.create_device("default", "owned-1", auth_type="certificateAuthority")
    with pytest.raises(Unauthorized, match="not issued by a CA this hub trusts"):
        _connect(services, "owned-1", chain=[device, owner.cert])
    certificates = services.hubs.certificates("default")
    view, _ = certificates.upload("owner", owner.pem)
    view = certificates.generate_verification_code("owner", if_match=view.etag)
    proof, _ = make_leaf(view.verification_code, owner)
    view = certificates.verify("owner", proof.public_bytes(Encoding.PEM), if_match=view.etag)
    assert _connect(services, "owned-1", chain=[device, owner.cert]).device_id == "owned-1"
    certificates.delete("owner", if_match=view.etag)
    with pytest.raises(Unauthorized, match="not issued by a CA this hub trusts"):
        _connect(services, "owned-1", chain=[device, owner.cert])
    # a device disabled after it connected is refused at its next CONNECT
    services.hubs.create_device("default", "dev-h1", auth_type="certificateAuthority", status="disabled")
    with pytest.raises(Unauthorized, match="is disabled"):
        _connect(services, "dev-h1", chain=chains["dev-h1"][:2])
