"""PKCS#11 key custody on SoftHSM2, in-process (issue 18): keys made on the token as non-extractable, sensitive,
private sign-only objects; no private material in the store; every signature by the token; a lost session re-opened
once; a missing key, token, module or a wrong PIN a clear error; a registration whose key is gone refused with a 503
and nothing written. Skips locally without SoftHSM2 / python-pkcs11; mandatory in CI."""

from __future__ import annotations

import base64
import logging
import os
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import func, select
from tests.conftest import database, installation
from tests.softhsm import PIN, SPARE_TOKEN, TOKEN, session_softhsm  # noqa: F401 - the fixture
from tests.unit.conftest import creds, register, symmetric_group
from tests.x509_helpers import p384_csr

from opendps.errors import ConfigurationError
from opendps.pki import KeyStore
from opendps.pki.pkcs11 import KeyUnavailable, Pkcs11Config, Pkcs11Signer, Pkcs11Token, read_pin
from opendps.store import DeviceRecord, HubDevice, IssuedCertificate, Registration, WrappedKey
from opendps.transport.sas import derive_device_key

PREVIEW = "2025-07-01-preview"


@pytest.fixture
def db_url(tmp_path):
    """SQLite only here (the custody code has no SQL of its own worth a second backend; the end-to-end test of
    tests/test_hsm_e2e.py runs on PostgreSQL)."""
    with database("sqlite", tmp_path) as url:
        yield url


@pytest.fixture
def hsm(session_softhsm):  # noqa: F811 - the fixture imported above
    return session_softhsm


@pytest.fixture
def token(hsm):
    t = Pkcs11Token(hsm.config())
    t.open()
    yield t
    t.close()


@pytest.fixture
def hsm_keys(store, master_key, token) -> KeyStore:
    """A key store whose new keys go to the token (as after ``opendps init --key-backend pkcs11``)."""
    k = KeyStore(store, master_key, token=token, default_backend="pkcs11")
    k.check_master_key()
    return k


def _private_object(token: Pkcs11Token, signer: Pkcs11Signer):
    import pkcs11

    session = token._session_here()
    return session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=signer.label, id=signer.cka_id)


def _verify(signer, data: bytes, signature: bytes) -> None:
    signer.public_key().verify(signature, data, ec.ECDSA(hashes.SHA384()))


# ---- custody: what is on the token, what is in the store ----
def test_a_key_is_made_on_the_token_and_only_referenced_in_the_store(hsm_keys, token, store):
    import pkcs11
    from pkcs11 import Attribute

    with store.session() as s:
        signer = hsm_keys.generate(s, "root")
    assert isinstance(signer, Pkcs11Signer) and signer.label == f"opendps-{signer.key_id}"
    with store.session() as s:
        row = s.get(WrappedKey, signer.key_id)
        assert row.backend == "pkcs11" and bytes(row.blob) == b"" and row.algorithm == "EC-P384"
        assert (row.pkcs11_token, row.pkcs11_label, row.pkcs11_id) == (TOKEN, signer.label, signer.cka_id.hex())
        spki = bytes(row.public_key)
    assert signer.public_key().public_bytes(Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == spki
    assert signer.public_key().curve.name == "secp384r1"
    private = _private_object(token, signer)
    assert private[Attribute.TOKEN] and private[Attribute.PRIVATE] and private[Attribute.SIGN]
    assert private[Attribute.SENSITIVE] and private[Attribute.ALWAYS_SENSITIVE]
    assert not private[Attribute.EXTRACTABLE] and private[Attribute.NEVER_EXTRACTABLE]
    assert not private[Attribute.DERIVE] and not private[Attribute.DECRYPT] and private[Attribute.LOCAL]
    with pytest.raises(pkcs11.AttributeSensitive):  # C_GetAttributeValue(CKA_VALUE): the token refuses
        private[Attribute.VALUE]
    data = b"to be signed"
    _verify(signer, data, signer.sign(data))
    # another process (the CLI, a worker) opens the same key from its row and signs through the token
    fresh = KeyStore(store, os.urandom(32), token=token).signer(signer.key_id)
    assert isinstance(fresh, Pkcs11Signer)
    _verify(fresh, data, fresh.sign(data))
    assert hsm_keys.custody(signer.key_id).backend == "pkcs11" and hsm_keys.tokens_in_use() == {TOKEN}


def test_software_and_token_keys_side_by_side(hsm_keys, store):
    with store.session() as s:
        soft = hsm_keys.generate(s, "ica", backend="software")
        hard = hsm_keys.generate(s, "ica")
    assert hsm_keys.custody(soft.key_id).backend == "software" and hsm_keys.custody(hard.key_id).label == hard.label
    with store.session() as s:
        assert bytes(s.get(WrappedKey, soft.key_id).blob) != b""
    from opendps.errors import InvalidInput

    with pytest.raises(InvalidInput, match="keyBackend must be one of"), store.session() as s:
        hsm_keys.generate(s, "ica", backend="tpm")


def test_no_fallback_to_software_where_the_token_is_not_configured(hsm_keys, store, master_key):
    with store.session() as s:
        signer = hsm_keys.generate(s, "ica")
    plain = KeyStore(store, master_key)  # a process started without --pkcs11-module
    with pytest.raises(KeyUnavailable, match="no PKCS#11 token is configured") as caught:
        plain.signer(signer.key_id)
    assert caught.value.status == 503 and caught.value.error_code == 503002
    from opendps.errors import InvalidInput

    with pytest.raises(InvalidInput, match="no PKCS#11 token configured"), store.session() as s:
        plain.generate(s, "ica", backend="pkcs11")
    # an installation whose new keys go to the token, opened without it: no software key instead
    with pytest.raises(KeyUnavailable, match="this process has none open"), store.session() as s:
        KeyStore(store, master_key, default_backend="pkcs11").generate(s, "root")


def test_a_key_made_in_a_transaction_that_rolls_back_leaves_the_token(hsm_keys, token, store, hsm):
    with pytest.raises(RuntimeError), store.session() as s:
        signer = hsm_keys.generate(s, "root")
        raise RuntimeError("the namespace insert failed")
    assert not [o for o in hsm.objects() if o.get("label") == signer.label]


def test_destroying_keys_deletes_them_from_the_token_after_commit(hsm_keys, store, hsm):
    with store.session() as s:
        signer = hsm_keys.generate(s, "root")
    assert len([o for o in hsm.objects() if o.get("label") == signer.label]) == 2  # private and public
    with store.session() as s:
        hsm_keys.destroy(s, [signer.key_id])
    assert not [o for o in hsm.objects() if o.get("label") == signer.label]


# ---- failures: at start, and during signing ----
def test_wrong_pin_missing_token_and_missing_module_are_one_line_configuration_errors(hsm):
    cases = [(hsm.config(pin="0000"), "wrong user PIN for PKCS#11 token 'opendps-test'"),
             (hsm.config(label="no-such-token"), "PKCS#11 token 'no-such-token' is not present"),
             (Pkcs11Config("/nonexistent/libpkcs11.so", TOKEN, PIN), "PKCS#11 module /nonexistent/libpkcs11.so does not exist")]
    for config, message in cases:
        with pytest.raises(ConfigurationError) as caught:
            Pkcs11Token(config).open()
        assert message in str(caught.value) and "\n" not in str(caught.value)
        assert config.pin not in str(caught.value) and config.pin not in repr(Pkcs11Token(config))


def test_a_wrong_pin_is_refused_while_the_process_is_logged_in(token, hsm):
    """C_Login does not check a PIN when the application is logged in already: the process's one session does."""
    with pytest.raises(ConfigurationError, match="wrong user PIN"):
        Pkcs11Token(hsm.config(pin="0000")).open()
    Pkcs11Token(hsm.config()).open()  # the right one shares the session


def test_the_pin_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENDPS_PKCS11_PIN", raising=False)
    with pytest.raises(ConfigurationError, match="set OPENDPS_PKCS11_PIN or give --pkcs11-pin-file"):
        read_pin()
    monkeypatch.setenv("OPENDPS_PKCS11_PIN", "from-env")
    assert read_pin() == "from-env"
    (tmp_path / "pin").write_text("from-file\n")
    assert read_pin(tmp_path / "pin") == "from-file"
    with pytest.raises(ConfigurationError, match="cannot read the PKCS#11 PIN file"):
        read_pin(tmp_path / "missing")


def test_a_lost_session_is_reopened_and_the_signature_retried_once(hsm_keys, token, store, caplog):
    with store.session() as s:
        signer = hsm_keys.generate(s, "ica")
    _verify(signer, b"one", signer.sign(b"one"))
    token._state.session.close()  # behind its back: the next call gets CKR_SESSION_HANDLE_INVALID
    with caplog.at_level(logging.WARNING, logger="opendps.pkcs11"):
        _verify(signer, b"two", signer.sign(b"two"))
    assert "re-opening the session and retrying once" in caplog.text and "SessionHandleInvalid" in caplog.text
    # the module itself re-initialised (a device re-inserted): every session of the process is gone
    token._module.reinitialize()
    _verify(signer, b"three", signer.sign(b"three"))


def test_a_session_that_cannot_be_reopened_is_a_clear_503(hsm_keys, token, store):
    with store.session() as s:
        signer = hsm_keys.generate(s, "ica")
    token._state.session.close()
    pin, token.config = token.config.pin, Pkcs11Config(token.config.module, token.config.token_label, "wrong-pin")
    try:
        with pytest.raises(KeyUnavailable, match="wrong user PIN") as caught:
            signer.sign(b"data")
        assert caught.value.status == 503
    finally:
        token.config = Pkcs11Config(token.config.module, token.config.token_label, pin)
    _verify(signer, b"data", signer.sign(b"data"))  # the next call opens afresh


def test_a_key_deleted_from_the_token_is_refused_not_replaced(hsm_keys, store, hsm):
    with store.session() as s:
        signer = hsm_keys.generate(s, "ica")
    signer.sign(b"warm")  # its handle is cached in this process's session
    hsm.tool("--delete-object", "--type", "privkey", "--label", signer.label)  # another process deletes it
    with pytest.raises(KeyUnavailable, match="is not on PKCS#11 token") as caught:
        signer.sign(b"data")
    assert caught.value.error_code == 503002


def test_a_token_key_that_does_not_match_the_stored_public_key_is_refused(hsm_keys, token, store):
    with store.session() as s:
        signer = hsm_keys.generate(s, "ica")
        other = hsm_keys.generate(s, "ica")
    impostor = Pkcs11Signer(signer.key_id, signer.public_key(), token, other.label, other.cka_id)
    with pytest.raises(KeyUnavailable, match="does not match the public key on record"):
        impostor.sign(b"data")


def test_threads_share_the_process_session(hsm_keys, store):
    with store.session() as s:
        signer = hsm_keys.generate(s, "ica")
    failures: list[BaseException] = []

    def sign_many(n: int) -> None:
        try:
            for i in range(10):
                data = f"{n}-{i}".encode()
                _verify(signer, data, signer.sign(data))
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=sign_many, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_a_forked_child_opens_its_own_session(hsm_keys, store):
    with store.session() as s:
        signer = hsm_keys.generate(s, "ica")
    signer.sign(b"parent")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: re-initialises the module, opens and logs in itself
        code = 1
        try:
            sig = signer.sign(b"child")
            os.write(write, sig)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    sig = os.read(read, 200)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    _verify(signer, b"child", sig)
    _verify(signer, b"parent again", signer.sign(b"parent again"))  # the parent's session is untouched


# ---- the CA on the token: issuance, rotation, CRL, and a refused registration ----
def test_the_seed_flow_in_process_with_both_ca_keys_on_the_token(hsm_keys, store):
    services = installation(store, hsm_keys)
    services.registry.create_namespace("hsm-fleet", "ops", validity_days=3)
    group_key = symmetric_group(services, "hsm-sensors", credentialPolicyName="ops")
    policy = services.registry.get_policy("hsm-fleet", "ops")
    issuer = services.registry.issuer(policy.policy_id)
    for key_id in (issuer.key_id, _root_key_id(services, "hsm-fleet")):
        assert hsm_keys.custody(key_id).backend == "pkcs11"
    rid = "hsm-dev-1"
    result = register(services, creds(rid, key=derive_device_key(group_key, rid)),
                      csr=base64.b64encode(p384_csr(rid)).decode(), api_version=PREVIEW)
    leaf, ica, root = (x509.load_der_x509_certificate(base64.b64decode(d))
                       for d in result["registrationState"]["issuedCertificateChain"])
    leaf.verify_directly_issued_by(ica)
    ica.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    # a rotation makes the new issuing CA's key on the token too, signed by the root on the token
    rotated = services.registry.rotate_policy("hsm-fleet", "ops")
    new_issuer = services.registry.issuer(rotated.policy_id)
    assert new_issuer.key_id != issuer.key_id and hsm_keys.custody(new_issuer.key_id).backend == "pkcs11"
    rotated.issuing_ca.verify_directly_issued_by(root)
    # the issuing CA's CRL is signed by the token
    from opendps.pki.status import ca_ref

    crl = x509.load_der_x509_crl(services.status.crl(ca_ref(rotated.issuing_ca)).der)
    assert crl.is_signature_valid(rotated.issuing_ca.public_key())


def _root_key_id(services, namespace: str) -> str:
    from opendps.store import CertificateAuthority, Namespace

    with services.store.session() as s:
        return s.scalar(select(CertificateAuthority.key_id).join(Namespace, Namespace.id == CertificateAuthority.namespace_id)
                        .where(Namespace.name == namespace, CertificateAuthority.kind == "root"))


def _count(services, model, column, value) -> int:
    with services.store.session() as s:
        return s.scalar(select(func.count()).select_from(model).where(column == value)) or 0


def test_a_registration_whose_issuing_key_is_gone_is_refused_with_503_and_nothing_written(hsm_keys, store, hsm):
    services = installation(store, hsm_keys)
    services.registry.create_namespace("hsm-gone", "ops")
    group_key = symmetric_group(services, "hsm-gone-group", credentialPolicyName="ops")
    issuer = services.registry.issuer(services.registry.get_policy("hsm-gone", "ops").policy_id)
    hsm.tool("--delete-object", "--type", "privkey", "--label", hsm_keys.custody(issuer.key_id).label)
    rid = "hsm-gone-dev"
    with pytest.raises(KeyUnavailable) as caught:
        services.provisioning.register(creds(rid, key=derive_device_key(group_key, rid)),
                                       csr=base64.b64encode(p384_csr(rid)).decode(), api_version=PREVIEW)
    assert caught.value.status == 503 and "is not on PKCS#11 token" in caught.value.message
    assert [_count(services, m, c, v) for m, c, v in (
        (IssuedCertificate, IssuedCertificate.registration_id, rid), (HubDevice, HubDevice.device_key, rid),
        (DeviceRecord, DeviceRecord.device_key, rid), (Registration, Registration.registration_key, rid))] == [0, 0, 0, 0]


def test_a_second_token_is_not_used_for_keys_of_the_first(hsm, store, master_key, hsm_keys):
    with store.session() as s:
        signer = hsm_keys.generate(s, "ica")
    spare = Pkcs11Token(hsm.config(SPARE_TOKEN))
    spare.open()
    with pytest.raises(KeyUnavailable, match="configured for token 'opendps-spare'"):
        KeyStore(store, master_key, token=spare).signer(signer.key_id)
    spare.close()
