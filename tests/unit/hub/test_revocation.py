"""Revocation (issue 17) in-process: the CA's views and revoke verbs, the hub refusing a revoked certificate at the
next CONNECT, and live sessions holding one dropped."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime

import pytest
from cryptography import x509
from tests.unit.conftest import creds, register, statements_run, symmetric_group
from tests.x509_helpers import p384_csr

from opendps.errors import Conflict, InvalidInput, NotFound, Unauthorized
from opendps.hub.auth import AuthenticatedDevice
from opendps.hub.live import LiveSessions
from opendps.pki import REVOCATION_REASONS, serial_hex, thumbprint
from opendps.transport.sas import derive_device_key

PREVIEW = "2025-07-01-preview"


def _issue(services, key, rid):
    state = register(services, creds(rid, key=derive_device_key(key, rid)), csr=base64.b64encode(p384_csr(rid)).decode(),
                     api_version=PREVIEW)["registrationState"]
    return [x509.load_der_x509_certificate(base64.b64decode(d)) for d in state["issuedCertificateChain"]]


@pytest.fixture
def fleet(services):
    services.registry.create_namespace("rev-ns", "ops")
    key = symmetric_group(services, "rev-group", credentialPolicyName="ops")
    return key, {rid: _issue(services, key, rid) for rid in ("dev-r1", "dev-r2")}


def _connect(services, device_id, chain):
    return services.hub_auth.connect("default.hubs.test", device_id, device_id, None, list(chain[:2]),
                                     datetime.now(UTC))


def test_views_by_serial_thumbprint_device_and_namespace(services, fleet):
    _, chains = fleet
    leaf = chains["dev-r1"][0]
    serial = serial_hex(leaf)
    assert serial == serial.upper() and len(serial) % 2 == 0
    for spelling in (serial, serial.lower(), ":".join(serial[i:i + 2] for i in range(0, len(serial), 2)),
                     thumbprint(leaf), "00" + serial):
        v = services.issuance.get(spelling)
        assert (v.serial_number, v.registration_id, v.revoked) == (serial, "dev-r1", False)
    assert {v.registration_id for v in services.issuance.list()} >= {"dev-r1", "dev-r2"}
    rids = services.devices.registration_ids("dev-r1")
    assert [v.serial_number for v in services.issuance.list(registration_ids=rids)] == [serial]
    cas = services.devices.issuing_ca_ids("rev-ns")
    assert len(services.issuance.list(issuing_ca_ids=cas)) == 2
    with pytest.raises(NotFound):
        services.devices.issuing_ca_ids("no-such-ns")
    with pytest.raises(NotFound, match="no certificate"):
        services.issuance.get("0102")
    for bad in ("xyz", "", "ab" * 21):
        with pytest.raises(InvalidInput):
            services.issuance.get(bad)


def test_revoke_one_then_connect_is_refused_and_the_first_reason_stays(services, fleet):
    _, chains = fleet
    assert _connect(services, "dev-r1", chains["dev-r1"]).device_id == "dev-r1"
    serial = serial_hex(chains["dev-r1"][0])
    with pytest.raises(InvalidInput, match="removeFromCRL"):
        services.issuance.revoke(serial, "removeFromCRL")
    v = services.issuance.revoke(serial, "keycompromise")
    assert (v.revoked, v.revocation_reason) == (True, "keyCompromise")
    with pytest.raises(Unauthorized, match=f"certificate {serial} is revoked \\(keyCompromise\\)"):
        _connect(services, "dev-r1", chains["dev-r1"])
    with pytest.raises(Conflict, match=f"certificate {serial} is already revoked \\(keyCompromise"):
        services.issuance.revoke(serial, "superseded")
    assert services.issuance.get(serial).revocation_reason == "keyCompromise"
    assert _connect(services, "dev-r2", chains["dev-r2"]).device_id == "dev-r2"  # the other device is untouched


def test_revoke_a_device_revokes_all_its_certificates_and_a_new_one_connects(services, fleet):
    key, chains = fleet
    older = chains["dev-r1"]
    newer = _issue(services, key, "dev-r1")  # re-registration: a second certificate
    revoked = services.issuance.revoke_registrations(services.devices.registration_ids("dev-r1"), "cessationOfOperation")
    assert {v.serial_number for v in revoked} == {serial_hex(older[0]), serial_hex(newer[0])}
    assert services.issuance.revoke_registrations(["dev-r1"]) == []  # nothing left to revoke
    for chain in (older, newer):
        with pytest.raises(Unauthorized, match="is revoked"):
            _connect(services, "dev-r1", chain)
    fresh = _issue(services, key, "dev-r1")
    assert _connect(services, "dev-r1", fresh).device_id == "dev-r1"
    with pytest.raises(InvalidInput, match="not one of"):
        services.issuance.revoke_registrations(["dev-r2"], "stolen")
    assert sorted(REVOCATION_REASONS)[0] == "aACompromise"


class _Link:
    def __init__(self, device: AuthenticatedDevice) -> None:
        self.device = device
        self.closed: str | None = None

    def close(self, reason: str) -> None:
        self.closed = reason


class _Peers:
    node_id = "here"

    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send(self, message, to=None):
        self.sent.append(message)


def _attached(services, chains) -> tuple[LiveSessions, dict[str, _Link], _Peers]:
    """Each device's session attached to live sessions that tell their messages to a recording peer list."""
    live = LiveSessions()
    links = {rid: _Link(_connect(services, rid, chains[rid])) for rid in chains}
    for link in links.values():
        live.attach(link)  # type: ignore[arg-type]
    peers = _Peers()
    live.peers = peers  # type: ignore[assignment]
    return live, links, peers


def test_live_sessions_drop_links_of_revoked_certificates_here_and_tell_other_nodes(services, fleet):
    _, chains = fleet
    live, links, peers = _attached(services, chains)
    serial = serial_hex(chains["dev-r1"][0])
    asyncio.run(live.revoke({serial.lower()}))
    assert links["dev-r1"].closed == f"certificate {serial} was revoked" and links["dev-r2"].closed is None
    assert peers.sent == [{"op": "revoked", "serials": [serial], "issuers": []}]
    live.on_peer_message({"op": "revoked", "serials": [serial_hex(chains["dev-r2"][0])]})  # from another node
    assert links["dev-r2"].closed is not None


def test_revoking_a_device_within_a_namespace_touches_only_that_namespaces_certificates(services, fleet):
    _, chains = fleet
    services.registry.create_namespace("other-ns", "other")
    rids = services.devices.registration_ids("dev-r2")
    # the device's certificates are under rev-ns's CA: scoped to another namespace, nothing is revoked
    elsewhere = services.devices.issuing_ca_ids("other-ns")
    assert services.issuance.revoke_registrations(rids, "superseded", issuing_ca_ids=elsewhere) == []
    assert services.issuance.revoke_registrations(rids, "superseded", issuing_ca_ids=[]) == []
    assert not services.issuance.get(serial_hex(chains["dev-r2"][0])).revoked
    done = services.issuance.revoke_registrations(rids, "superseded",
                                                  issuing_ca_ids=services.devices.issuing_ca_ids("rev-ns"))
    assert [v.serial_number for v in done] == [serial_hex(chains["dev-r2"][0])]
    assert services.issuance.get(serial_hex(chains["dev-r1"][0])).revoked is False  # the other device is untouched


# ---- superseded certificates (issue 17.2) ----
def test_a_renewed_certificates_first_connect_revokes_the_older_one_as_superseded(services, fleet):
    key, chains = fleet
    old = chains["dev-r1"]
    seen, stop = statements_run(services.store)
    try:
        assert _connect(services, "dev-r1", old).superseded == ()  # its own first CONNECT: nothing older
    finally:
        stop()
    # nothing older to supersede (the record's read says so, and nothing can change that): the CONNECT writes nothing
    assert [q.split()[0] for q in seen if " issued_certificates " in f" {q} "] == ["SELECT"], seen
    assert not [q for q in seen if q.split()[0] in ("INSERT", "UPDATE", "DELETE")], seen
    new = _issue(services, key, "dev-r1")  # re-registration: a new certificate; the old one still works until used
    assert _connect(services, "dev-r1", old).device_id == "dev-r1"
    first = _connect(services, "dev-r1", new)
    assert first.superseded == (serial_hex(old[0]),)
    assert _connect(services, "dev-r1", new).superseded == ()  # once per certificate: later CONNECTs write nothing
    assert services.issuance.get(serial_hex(old[0])).revocation_reason == "superseded"
    with pytest.raises(Unauthorized, match="revoked \\(superseded\\)"):
        _connect(services, "dev-r1", old)
    assert not services.issuance.get(serial_hex(chains["dev-r2"][0])).revoked  # another device is untouched


def test_keep_superseded_is_azures_behaviour_old_certificates_work_until_they_expire(services, fleet):
    key, chains = fleet
    view, _ = services.registry.put_policy("rev-ns", "ops", revoke_superseded=False)
    assert view.revoke_superseded is False
    new = _issue(services, key, "dev-r2")
    assert _connect(services, "dev-r2", new).superseded == ()
    assert _connect(services, "dev-r2", chains["dev-r2"]).device_id == "dev-r2"
    assert not services.issuance.get(serial_hex(chains["dev-r2"][0])).revoked
    with pytest.raises(InvalidInput, match="revokeSupersededCertificates must be true or false"):
        services.registry.put_policy("rev-ns", "ops", revoke_superseded="no")


def test_crl_validity_hours_is_a_policy_setting_within_bounds(services, fleet):
    assert services.registry.get_policy("rev-ns", "ops").crl_validity_hours == 24
    assert services.registry.put_policy("rev-ns", "ops", crl_validity_hours=6)[0].crl_validity_hours == 6
    assert services.registry.issuer(services.registry.get_policy("rev-ns", "ops").policy_id).crl_validity_hours == 6
    for bad in (0, 169, "6", True):
        with pytest.raises(InvalidInput, match="crlValidityInHours"):
            services.registry.put_policy("rev-ns", "ops", crl_validity_hours=bad)


# ---- revoking by policy and by issuing CA (issue 17.1) ----
def test_revoking_a_policys_certificates_revokes_all_of_them_and_the_policy_goes_on(services, fleet):
    key, chains = fleet
    ids, cas = services.registry.policy_issuing_ca_ids("rev-ns", "ops")
    assert services.issuance.revoke_issued_by(ids, "privilegeWithdrawn") == 2
    assert services.issuance.revoke_issued_by(ids, "privilegeWithdrawn") == 0  # already revoked: untouched
    for rid, chain in chains.items():
        with pytest.raises(Unauthorized, match="revoked \\(privilegeWithdrawn\\)"):
            _connect(services, rid, chain)
    fresh = _issue(services, key, "dev-r1")  # the policy still issues
    assert _connect(services, "dev-r1", fresh).device_id == "dev-r1"


def test_revoking_an_issuing_ca_needs_a_rotation_first_then_revokes_it_and_its_leaves(services, fleet):
    key, chains = fleet
    [active] = services.registry.list_issuing_cas("rev-ns", "ops")
    assert active.status == "active"
    with pytest.raises(Conflict, match="rotate the policy first"):
        services.registry.revoke_issuing_ca("rev-ns", "ops", serial_hex(active.certificate), "keyCompromise",
                                            services.issuance)
    services.registry.rotate_policy("rev-ns", "ops")
    fresh = _issue(services, key, "dev-r2")  # from the new CA
    new_ca, old_ca = services.registry.list_issuing_cas("rev-ns", "ops")
    assert (new_ca.status, old_ca.status) == ("active", "retired")
    assert _connect(services, "dev-r1", chains["dev-r1"]).device_id == "dev-r1"  # the retired CA is still trusted
    done = services.registry.revoke_issuing_ca("rev-ns", "ops", thumbprint(old_ca.certificate), "keyCompromise",
                                               services.issuance)
    assert (done.ca.status, done.ca.revocation_reason, done.leaves_revoked) == ("revoked", "keyCompromise", 2)
    assert services.issuance.get(serial_hex(chains["dev-r1"][0])).revocation_reason == "cACompromise"
    with pytest.raises(Unauthorized, match="not issued by a CA this hub trusts"):  # trust dropped at once
        _connect(services, "dev-r1", chains["dev-r1"])
    assert _connect(services, "dev-r2", fresh).device_id == "dev-r2"  # the new CA's leaves connect
    assert [c.certificate for c in services.hubs.trusted_cas("default")] == [new_ca.certificate]
    with pytest.raises(Conflict, match="already revoked"):
        services.registry.revoke_issuing_ca("rev-ns", "ops", serial_hex(old_ca.certificate), None, services.issuance)
    with pytest.raises(NotFound, match="no issuing CA"):
        services.registry.revoke_issuing_ca("rev-ns", "ops", "0102", None, services.issuance)
    with pytest.raises(InvalidInput, match="reason"):
        services.registry.revoke_issuing_ca("rev-ns", "ops", "0102", "because", services.issuance)


def test_live_sessions_are_dropped_by_their_certificates_issuer(services, fleet):
    _, chains = fleet
    live, links, peers = _attached(services, chains)
    asyncio.run(live.revoke(set(), issuers={"00" * 20}))  # another CA's key id: nobody goes
    assert all(link.closed is None for link in links.values())
    ica = chains["dev-r1"][1]
    ski = ica.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    live.on_peer_message({"op": "revoked", "serials": [], "issuers": [ski.upper()]})  # from another node
    assert all(link.closed is not None for link in links.values())
    assert peers.sent[0]["issuers"] == ["00" * 20]


# ---- the audit log records every revocation and CA change (issue 17.4) ----
def _entries(services, action):
    return [(r.subject, r.details_object()) for r in services.audit.list(action=action, top=1000)][::-1]


def test_revocations_and_ca_changes_are_in_the_audit_chain(services, fleet):
    key, chains = fleet
    created = _entries(services, "ca.created")
    assert [(d["kind"], d.get("policy")) for _s, d in created[-2:]] == [("root", None), ("issuing", "ops")]
    root_subject, _ = created[-2]
    assert root_subject == thumbprint(chains["dev-r1"][2])  # the root's thumbprint, never its key
    one = serial_hex(chains["dev-r1"][0])
    services.issuance.revoke(one, "keyCompromise")
    assert _entries(services, "certificate.revoked")[-1] == (one, {"sha256": thumbprint(chains["dev-r1"][0]),
                                                                   "reason": "keyCompromise"})
    new = _issue(services, key, "dev-r2")
    _connect(services, "dev-r2", new)  # supersedes dev-r2's first certificate
    subject, details = _entries(services, "certificate.revoked")[-1]
    assert (subject, details["reason"], details["supersededBy"]) == (serial_hex(chains["dev-r2"][0]), "superseded",
                                                                      serial_hex(new[0]))
    services.registry.put_policy("rev-ns", "ops", revoke_superseded=False)
    assert _entries(services, "policy.updated")[-1] == ("ops", {"revokeSupersededCertificates": False})
    services.registry.rotate_policy("rev-ns", "ops")
    _new_ca, old_ca = services.registry.list_issuing_cas("rev-ns", "ops")
    subject, details = _entries(services, "ca.rotated")[-1]
    assert details["retired"] == [thumbprint(old_ca.certificate)] and details["policy"] == "ops"
    services.registry.revoke_issuing_ca("rev-ns", "ops", serial_hex(old_ca.certificate), "keyCompromise",
                                        services.issuance)
    subject, details = _entries(services, "ca.revoked")[-1]
    assert (subject, details["revokedCertificates"], details["leafReason"]) == (
        thumbprint(old_ca.certificate), 1, "cACompromise")  # dev-r2's renewed one; the others were revoked before
    ids, _ = services.registry.policy_issuing_ca_ids("rev-ns", "ops")
    services.issuance.revoke_issued_by(ids, "cessationOfOperation", audit_scope={"namespace": "rev-ns", "policy": "ops"})
    subject, details = _entries(services, "certificate.revoked")[-1]
    assert details == {"namespace": "rev-ns", "policy": "ops", "count": 0, "reason": "cessationOfOperation"}
    assert services.audit.verify().intact


def test_sessions_connect_would_refuse_now_are_named_for_the_catch_up_after_a_bus_outage(services, fleet):
    """A drop (device disabled or deleted) or a revocation reaches the other nodes' sessions as a live message, lost
    while the bus is away: a disabled device stayed connected there until it reconnected. When the bus is back each
    node asks ``no_longer_allowed`` of its sessions: these are what CONNECT would refuse now, with why."""
    _, chains = fleet
    r1, r2 = (_connect(services, rid, chains[rid]) for rid in ("dev-r1", "dev-r2"))
    hub = services.hubs.get("default")
    services.hubs.create_device("default", "sas-ok")
    services.hubs.create_device("default", "sas-off")
    ok, off, gone = (AuthenticatedDevice(hub.id, hub.name, hub.host_name, d, d, "sas")
                     for d in ("sas-ok", "sas-off", "sas-gone"))
    assert services.hub_auth.no_longer_allowed([r1, r2, ok, off]) == []
    services.issuance.revoke(r1.certificate_serial, "keyCompromise")
    services.hubs.create_device("default", "sas-off", status="disabled")
    refused = services.hub_auth.no_longer_allowed([r1, r2, ok, off, gone])
    assert [(d.device_id, why) for d, why in refused] == [
        ("dev-r1", f"certificate {r1.certificate_serial} was revoked while the live bus was away"),
        ("sas-off", "disabled or deleted by the service while the live bus was away"),
        ("sas-gone", "disabled or deleted by the service while the live bus was away")]
    assert services.hub_auth.no_longer_allowed([]) == []
