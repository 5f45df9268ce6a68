"""The domain services of one installation, wired once and handed to front ends as one typed object.

Dependencies point down: provisioning -> hub -> registry -> pki -> store. Two questions go up, and are
answered through protocols bound here rather than imports: the registry and the hubs ask the
enrollments (provisioning) which of them name a policy or a hub
(:class:`~opendps.registry.PolicyReferrers`, :class:`~opendps.hub.EnrollmentLinks`).
"""

from __future__ import annotations

from dataclasses import dataclass

from opendps.audit import AuditLog
from opendps.audit.refusals import RefusalLog
from opendps.hub import CloudToDevice, HubAuthenticator, Hubs, TelemetryRoutes, TelemetrySink
from opendps.hub.inventory import HubInventory
from opendps.pki import IssuanceEngine, KeyStore, Publication, StatusResponder
from opendps.pki.inventory import CertificateInventory
from opendps.provisioning import AccessPolicies, DpsCertificates
from opendps.provisioning.enrollments import Enrollments
from opendps.provisioning.inventory import ProvisioningInventory
from opendps.provisioning.registration import Provisioning
from opendps.registry import DeviceRegistry, Registry
from opendps.registry.inventory import RegistryInventory
from opendps.registry.publication import PublishedAuthorities
from opendps.store import Store


@dataclass(frozen=True)
class Inventory:
    """The read-only counts each package keeps of its own rows (``GET /status``, the metrics' store gauges), and the
    refusal log: cheap aggregate queries, one owner each."""

    certificates: CertificateInventory  # pki: valid certificates per policy and their expiry
    registry: RegistryInventory  # namespaces, policies, their names
    hubs: HubInventory  # linked hubs, identities, connected devices
    provisioning: ProvisioningInventory  # enrollments, provisioned devices, recent operations
    refusals: RefusalLog  # audit: device requests refused lately


@dataclass(frozen=True)
class Services:
    store: Store
    keys: KeyStore
    issuance: IssuanceEngine  # pki: the CA
    status: StatusResponder  # pki: each CA's CRL and the OCSP answers (the registry names the CAs)
    registry: Registry  # ADR: namespaces, credentials, policies
    devices: DeviceRegistry  # ADR: the namespaces' device registries
    hubs: Hubs
    hub_auth: HubAuthenticator
    telemetry: TelemetrySink
    routes: TelemetryRoutes  # where each hub also sends its telemetry (NATS)
    c2d: CloudToDevice
    ca_certificates: DpsCertificates  # DPS CA certificates (proof of possession)
    enrollments: Enrollments
    provisioning: Provisioning  # the RA
    access_policies: AccessPolicies  # who may call the service API (shared access policies and their rights)
    audit: AuditLog  # the tamper-evident audit log: listing and checking it (domain calls append in their transactions)
    inventory: Inventory  # what each package counts of its rows (status, metrics)

    @property
    def id_scope(self) -> str:
        return self.provisioning.id_scope


def wire(store: Store, keys: KeyStore, *, id_scope: str, hub_domain: str = "localhost", lint: bool = True,
         publication: Publication | None = None) -> Services:
    """Build every domain service on ``store`` (``hub_domain``: the suffix of new hubs' default host names;
    ``publication``: where CRLs and OCSP are served, named in new certificates — None: they name none)."""
    issuance = IssuanceEngine(store, keys, lint=lint, publication=publication)
    status = StatusResponder(store, keys, lint=lint)
    status.authorities = PublishedAuthorities(store)  # the registry names the CAs whose status is published
    registry = Registry(store, keys, lint=lint)
    registry.publication = publication  # new issuing CAs name their root's CRL
    devices = DeviceRegistry(store)
    hubs = Hubs(store, keys, registry, domain=hub_domain)
    ca_certificates = DpsCertificates(store)
    enrollments = Enrollments(store, keys, registry, hubs, ca_certificates)
    registry.referrers = enrollments
    hubs.enrollments = enrollments
    provisioning = Provisioning(store, enrollments=enrollments, ca_certificates=ca_certificates, registry=registry,
                                devices=devices, hubs=hubs, issuance=issuance, id_scope=id_scope)
    return Services(store=store, keys=keys, issuance=issuance, status=status, registry=registry, devices=devices, hubs=hubs,
                    hub_auth=HubAuthenticator(hubs, issuance, devices), telemetry=TelemetrySink(store),
                    routes=TelemetryRoutes(store),
                    c2d=CloudToDevice(store), ca_certificates=ca_certificates, enrollments=enrollments,
                    provisioning=provisioning, access_policies=AccessPolicies(store, keys), audit=AuditLog(store),
                    inventory=Inventory(CertificateInventory(store), RegistryInventory(store), HubInventory(store),
                                        ProvisioningInventory(store), RefusalLog(store)))
