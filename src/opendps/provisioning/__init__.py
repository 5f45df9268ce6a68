"""DPS core: CA certificates with proof of possession, enrollments, attestation, allocation,
registrations and operations. Front ends call :class:`Provisioning`; it decides."""

from opendps.provisioning.ca_certificates import CaCertificates, DpsCertificateView, load_certificate_text

__all__ = ["CaCertificates", "DpsCertificateView", "load_certificate_text"]
