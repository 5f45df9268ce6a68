"""Wire models of the management API (pydantic). Field names are Azure's camelCase."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- DPS CA certificates ----
class CertificateBodyProperties(_In):
    certificate: StrictStr


class CertificateBody(_In):
    """Upload body: ``{"properties": {"certificate": PEM|base64 DER}}`` (top-level ``certificate`` also accepted)."""

    properties: CertificateBodyProperties | None = None
    certificate: StrictStr | None = None


# ---- issued (operational) certificates and their revocation ----
class RevokeBody(_In):
    reason: StrictStr | None = None  # an RFC 5280 CRLReason name; default unspecified


class RevokeDeviceBody(_In):
    deviceId: StrictStr  # a device id or registration id: every unrevoked certificate issued to it
    namespace: StrictStr | None = None
    reason: StrictStr | None = None


class IssuedCertificateResponse(_Out):
    serialNumber: str  # upper-case hex of whole octets, as openssl prints it
    sha256Thumbprint: str
    registrationId: str
    notBefore: str
    notAfter: str
    issuedAt: str
    revoked: bool
    revokedAt: str | None = None
    revocationReason: str | None = None


class IssuedCertificateList(_Out):
    value: list[IssuedCertificateResponse]


class RevokedCount(_Out):
    revokedCertificateCount: int  # operational certificates revoked by this call (those already revoked stay as they are)


class IssuingCaResponse(_Out):
    serialNumber: str
    thumbprint: str  # SHA-256, upper-case hex
    subject: str
    status: Literal["active", "retired", "revoked"]
    notBefore: str
    notAfter: str
    createdAt: str
    revokedAt: str | None = None
    revocationReason: str | None = None
    certificate: str  # PEM


class IssuingCaList(_Out):
    value: list[IssuingCaResponse]


class IssuingCaRevocationResponse(_Out):
    issuingCa: IssuingCaResponse
    revokedCertificateCount: int


class VerificationBody(_In):
    certificate: StrictStr


class CertificateProperties(_Out):
    subject: str
    expiry: str
    thumbprint: str
    sha256Thumbprint: str
    isVerified: bool
    created: str
    updated: str
    certificate: str
    verificationCode: str | None = None


class CertificateResponse(_Out):
    name: str
    etag: str
    type: str = "Microsoft.Devices/provisioningServices/Certificates"
    properties: CertificateProperties


# ---- ADR ----
class NamespaceBodyProperties(_In):
    policyName: StrictStr = "default"
    validityPeriodInDays: StrictInt = 30
    keyBackend: StrictStr | None = None  # software | pkcs11: where the root's (and first policy's) key is made
    policyKeyBackend: StrictStr | None = None  # the first policy's issuing CA key, when not where the root's is


class NamespaceBody(_In):
    properties: NamespaceBodyProperties = NamespaceBodyProperties()


class CredentialSummary(_Out):
    name: str
    subject: str
    thumbprint: str
    notBefore: str
    notAfter: str


class NamespaceProperties(_Out):
    provisioningState: Literal["Succeeded"] = "Succeeded"
    createdAt: str
    credential: CredentialSummary
    policies: list[str]


class NamespaceResponse(_Out):
    name: str
    etag: str
    properties: NamespaceProperties


class CredentialProperties(_Out):
    subject: str
    thumbprint: str
    serialNumber: str
    notBefore: str
    notAfter: str
    keyType: Literal["ECC"] = "ECC"
    curve: str
    certificate: str
    keyBackend: str  # software | pkcs11
    tokenLabel: str | None = None  # pkcs11: the token holding the key
    keyLabel: str | None = None  # pkcs11: the key's CKA_LABEL on it


class CredentialResponse(_Out):
    name: str
    properties: CredentialProperties


class CaConfigurationIn(_In):
    keyType: Literal["ECC"] = "ECC"
    crlValidityInHours: StrictInt | None = None  # nextUpdate of the issuing CA's CRL and OCSP responses (1-168)
    keyBackend: StrictStr | None = None  # software | pkcs11, for a new policy's issuing CA (a rotation moves one)


class LeafConfigurationIn(_In):
    validityPeriodInDays: StrictInt | None = None
    allowP256: StrictBool | None = None
    # true (default): a renewed certificate's first hub CONNECT revokes the device's older ones as superseded;
    # false: Azure's behaviour, an old certificate stays valid until it expires
    revokeSupersededCertificates: StrictBool | None = None


class PolicyCertificateIn(_In):
    certificateAuthorityConfiguration: CaConfigurationIn | None = None
    leafCertificateConfiguration: LeafConfigurationIn | None = None


class PolicyBodyProperties(_In):
    certificate: PolicyCertificateIn | None = None


class PolicyBody(_In):
    properties: PolicyBodyProperties | None = None


class CaConfigurationOut(_Out):
    keyType: Literal["ECC"] = "ECC"
    curve: str
    subject: str
    thumbprint: str
    notBefore: str
    notAfter: str
    certificate: str
    crlValidityInHours: int
    keyBackend: str  # software | pkcs11
    tokenLabel: str | None = None  # pkcs11: the token holding the issuing CA's key
    keyLabel: str | None = None  # pkcs11: the key's CKA_LABEL on it


class LeafConfigurationOut(_Out):
    validityPeriodInDays: int
    allowP256: bool
    revokeSupersededCertificates: bool


class PolicyCertificateOut(_Out):
    certificateAuthorityConfiguration: CaConfigurationOut
    leafCertificateConfiguration: LeafConfigurationOut


class PolicyProperties(_Out):
    certificate: PolicyCertificateOut
    createdAt: str
    updatedAt: str


class RotateBody(_In):
    """``POST .../rotate``'s optional body: where the new issuing CA's key is made (default: where the old one's is)."""

    keyBackend: StrictStr | None = None


class PolicyResponse(_Out):
    name: str
    etag: str
    properties: PolicyProperties


class ErrorBody(_Out):
    errorCode: int
    trackingId: str
    message: str
    timestampUtc: str
    info: dict[str, str] = {}


class CertificateList(_Out):
    value: list[CertificateResponse]


class NamespaceList(_Out):
    value: list[NamespaceResponse]


class PolicyList(_Out):
    value: list[PolicyResponse]


# ---- DPS shared access policies (az iot dps policy) ----
class AccessPolicyBody(_In):
    """``{"rights": "EnrollmentRead, RegistrationStatusRead"}`` (or a list); keys are generated unless given."""

    rights: StrictStr | list[StrictStr]
    primaryKey: StrictStr | None = None
    secondaryKey: StrictStr | None = None


class AccessPolicyResponse(_Out):
    """A policy as list and show give it: never its keys."""

    keyName: str
    rights: str


class AccessPolicyList(_Out):
    value: list[AccessPolicyResponse]


class AccessPolicyKeys(_Out):
    keyName: str
    rights: str
    primaryKey: str
    secondaryKey: str


class RenewKeyBody(_In):
    renewKey: StrictStr  # primary | secondary | swap (the domain says which are allowed)
