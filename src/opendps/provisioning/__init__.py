"""DPS core: CA certificates with proof of possession (now), enrollments, attestation, allocation,
registrations and operations (device-plane issues)."""

from opendps.provisioning.ca_certificates import CaCertificates, DpsCertificateView, load_certificate_text

__all__ = ["CaCertificates", "DpsCertificateView", "load_certificate_text"]
