"""opendps: a self-hosted IoT Device Provisioning Service with a managed X.509 PKI and IoT hub."""

__version__ = "0.1.0"
