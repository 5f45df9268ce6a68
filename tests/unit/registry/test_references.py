"""ADR rules that involve other packages' rows: enrollments block deleting the policies they name (asked through
the wired ``PolicyReferrers``), and a namespace takes its PKI with it."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from tests.x509_helpers import p384_csr

from opendps.errors import Conflict, NotFound
from opendps.store import CertificateAuthority, IssuedCertificate, WrappedKey


def _count(services, model) -> int:
    with services.store.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


@pytest.fixture
def used(services):
    services.registry.create_namespace("ref-ns", "used")
    services.enrollments.put("group", "factory-line-1", {"attestation": {"type": "symmetricKey"},
                                                         "credentialPolicyName": "used"})
    return services


def test_a_policy_named_by_an_enrollment_cannot_be_deleted(used):
    with pytest.raises(Conflict, match=r"policy 'used' is referenced by 1 enrollment\(s\) \(factory-line-1\)") as info:
        used.registry.delete_policy("ref-ns", "used")
    assert info.value.error_code == 409002
    with pytest.raises(Conflict, match="referenced by enrollments"):
        used.registry.delete_namespace("ref-ns")
    assert used.registry.get_policy("ref-ns", "used").name == "used"
    used.enrollments.delete("group", "factory-line-1")
    used.registry.delete_policy("ref-ns", "used")
    with pytest.raises(NotFound):
        used.registry.get_policy("ref-ns", "used")
    with used.store.session() as s:  # the issuing CA is retired, not deleted: its certificates keep their issuer
        assert [ca.status for ca in s.scalars(select(CertificateAuthority).where(CertificateAuthority.kind == "issuing"))] \
            == ["retired"]


def test_a_namespace_takes_its_pki_with_it(used):
    issuer = used.registry.issuer(used.registry.find_policy("used").policy_id)
    used.issuance.issue(issuer, p384_csr("dev-r1"), "dev-r1")
    assert (_count(used, CertificateAuthority), _count(used, IssuedCertificate)) == (2, 1)
    keys_before = _count(used, WrappedKey)
    used.enrollments.delete("group", "factory-line-1")
    used.registry.delete_namespace("ref-ns")
    assert (_count(used, CertificateAuthority), _count(used, IssuedCertificate)) == (0, 0)
    assert _count(used, WrappedKey) == keys_before - 2
    with pytest.raises(NotFound):
        used.registry.get_namespace("ref-ns")


def test_the_issuer_follows_rotation(used):
    policy_id = used.registry.find_policy("used", "ref-ns").policy_id
    before = used.registry.issuer(policy_id)
    used.registry.rotate_policy("ref-ns", "used")
    after = used.registry.issuer(policy_id)
    assert after.certificate != before.certificate and after.root == before.root and after.ca_id != before.ca_id
    chain = used.issuance.issue(after, p384_csr("dev-r2"), "dev-r2")
    assert chain.issuing_ca == after.certificate


def test_serials_are_shown_as_azure_shows_them():
    """Issue 12.19: upper-case hex of whole octets, a leading zero kept, in every document."""
    from opendps.pki import serial_hex

    assert serial_hex(0x0ABC) == "0ABC" and serial_hex(0xABC) == "0ABC" and serial_hex(1 << 127) == "80" + "00" * 15
    assert serial_hex(0) == "00"
