"""Certificates that parse only in part: cryptography reads a certificate's fields when first asked and raises its
parsers' own errors there (not always ValueError), while OpenSSL takes such certificates in a TLS handshake. Each
must be refused where it arrives, with the reason, at a hub CONNECT, a DPS registration and the service API
(these were a traceback at a CONNECT and a 500 on the others)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.unit.conftest import creds
from tests.x509_helpers import make_leaf

from opendps.errors import InvalidInput, Unauthorized
from opendps.pki import issued_by, load_certificate_text, thumbprint, unreadable
from opendps.provisioning.attestation import AttestationFailed

# cryptography warns when it reads a negative serial number: that is the input these tests send
pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number:cryptography.utils.CryptographyDeprecationWarning")


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _negative_serial(cert: x509.Certificate) -> x509.Certificate:
    der = _der(cert)
    serial = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 8) // 8, "big")  # with its sign octet
    encoded = bytes((0x02, len(serial))) + serial
    return x509.load_der_x509_certificate(der.replace(encoded, bytes((0x02, len(serial), 0x80)) + serial[1:], 1))


def _broken_eku(cert: x509.Certificate) -> x509.Certificate:
    """The extended key usage's OID turned into an INTEGER: the extension no longer parses."""
    der = _der(cert)
    oid = bytes.fromhex("06082b06010505070302")  # id-kp-clientAuth
    return x509.load_der_x509_certificate(der.replace(oid, bytes.fromhex("02082b06010505070302"), 1))


def _duplicate_extension(cert: x509.Certificate) -> x509.Certificate:
    """The extended key usage's extension OID changed to basicConstraints': two basicConstraints extensions."""
    der = _der(cert)
    return x509.load_der_x509_certificate(der.replace(bytes.fromhex("0603551d25"), bytes.fromhex("0603551d13"), 1))


BROKEN = {"negative serial": (_negative_serial, "serial number is not a positive integer"),
          "broken extension": (_broken_eku, "error parsing"),
          "duplicate extension": (_duplicate_extension, "Duplicate")}


@pytest.mark.parametrize("label", list(BROKEN))
def test_what_cannot_be_read_is_named(label):
    good, _ = make_leaf("dev-u1", None)
    assert unreadable(good) is None
    breaks, words = BROKEN[label]
    bad = breaks(good)
    why = unreadable(bad)
    assert why is not None and words in why, why
    with pytest.raises(InvalidInput, match=f"certificate cannot be read: .*{words}"):
        load_certificate_text(base64.b64encode(_der(bad)).decode())


def test_a_certificate_of_an_unknown_version_is_refused_not_raised():
    good, _ = make_leaf("dev-u2", None)
    der = _der(good)
    at = der.index(b"\xa0\x03\x02\x01\x02")
    v4 = der[:at] + b"\xa0\x03\x02\x01\x03" + der[at + 5:]
    with pytest.raises(InvalidInput, match="version number 3"):  # x509.InvalidVersion is not a ValueError
        load_certificate_text(base64.b64encode(v4).decode())


def test_a_key_on_a_curve_nobody_knows_is_named():
    """The service API's certificate inputs read the public key too (UnsupportedAlgorithm, not a ValueError)."""
    good, _ = make_leaf("dev-u4", None)
    p256 = bytes.fromhex("06082a8648ce3d030107")  # prime256v1, in the SubjectPublicKeyInfo
    unknown = x509.load_der_x509_certificate(_der(good).replace(p256, bytes.fromhex("06082a8648ce3d030109"), 1))
    assert "not supported" in (unreadable(unknown) or "")
    assert unreadable(unknown, key=False) is None  # a handshake's leaf: OpenSSL has used its key already
    with pytest.raises(InvalidInput, match="cannot be read: .*not supported"):
        load_certificate_text(base64.b64encode(_der(unknown)).decode())


def test_a_signature_algorithm_nobody_knows_is_not_issued_by():
    ca, _ = make_leaf("ca-u", None)
    child, _ = make_leaf("ca-u", None)  # the same subject, so only the signature decides
    der = _der(child)
    sha256_ecdsa = bytes.fromhex("06082a8648ce3d040302")  # ecdsa-with-SHA256, in the TBS and the outer algorithm
    unknown = x509.load_der_x509_certificate(der.replace(sha256_ecdsa, bytes.fromhex("06082a8648ce3d040309")))
    assert issued_by(unknown, ca) is False  # was UnsupportedAlgorithm


@pytest.mark.parametrize("label", list(BROKEN))
def test_a_hub_refuses_an_unreadable_device_certificate(services, label):
    good, _ = make_leaf(f"self-{len(label)}", None)
    bad = BROKEN[label][0](good)
    services.hubs.create_device("default", f"self-{len(label)}", auth_type="selfSigned",
                                thumbprints=(thumbprint(bad, "sha1"), None))
    with pytest.raises(Unauthorized, match="device certificate cannot be read") as info:
        services.hub_auth.connect("default.hubs.test", f"self-{len(label)}", f"self-{len(label)}", None, [bad],
                                  datetime.now(UTC))
    assert info.value.reason == "untrusted_certificate"


@pytest.mark.parametrize("label", list(BROKEN))
def test_a_registration_refuses_an_unreadable_client_chain(services, label):
    good, _ = make_leaf("dev-u3", None)
    bad = BROKEN[label][0](good)
    for chain, words in (((bad,), "device certificate cannot be read"),
                         ((good, bad), "client chain certificate 1 cannot be read")):
        with pytest.raises(AttestationFailed, match=words) as info:
            services.provisioning.register(creds("dev-u3", chain=chain))
        assert info.value.status == 401
