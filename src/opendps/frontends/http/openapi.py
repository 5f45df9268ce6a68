"""The OpenAPI 3.1 document of the management API, served at ``/openapi.json``.

Schemas come from the pydantic wire models, so the document cannot drift from what is parsed
and returned; the path table below is the one place that lists operations.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from opendps import __version__
from opendps.frontends.http import models as m
from opendps.frontends.http.audit import AuditEntryList, AuditVerification

_IF_MATCH = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}
_IF_MATCH_REQUIRED = {**_IF_MATCH, "required": True}
_IF_NONE_MATCH = {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"}}
_API_VERSION = {"name": "api-version", "in": "query", "required": False, "schema": {"type": "string"}}
_MAX_ITEM_COUNT = {"name": "x-ms-max-item-count", "in": "header", "required": False, "schema": {"type": "integer"}}
_DEVICE_ID_QUERY = {"name": "deviceId", "in": "query", "required": False, "schema": {"type": "string"}}
_NAMESPACE_QUERY = {"name": "namespace", "in": "query", "required": False, "schema": {"type": "string"}}
_CONTINUATION = {"name": "x-ms-continuation", "in": "header", "required": False, "schema": {"type": "string"}}


def _query(name: str, kind: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind}}


_KEYSET = [_query("top", "integer"), _query("continuationToken", "string")]  # a keyset-paged list


# (method, path, summary, request model, response model, success status, extra parameters)
OPERATIONS: list[tuple[str, str, str, type[BaseModel] | None, type[BaseModel] | None, int, list[dict[str, Any]]]] = [
    ("put", "/certificates/{name}", "Upload a CA certificate (If-Match to replace)", m.CertificateBody,
     m.CertificateResponse, 201, [_IF_MATCH]),
    ("get", "/certificates", "List CA certificates", None, m.CertificateList, 200, []),
    ("get", "/certificates/{name}", "Show a CA certificate", None, m.CertificateResponse, 200, []),
    ("delete", "/certificates/{name}", "Delete a CA certificate", None, None, 204, [_IF_MATCH]),
    ("post", "/certificates/{name}/generateVerificationCode", "Generate a proof-of-possession code", None,
     m.CertificateResponse, 200, [_IF_MATCH_REQUIRED]),
    ("post", "/certificates/{name}/verify", "Verify possession with a certificate whose CN is the code",
     m.VerificationBody, m.CertificateResponse, 200, [_IF_MATCH_REQUIRED]),
    ("get", "/deviceCertificates", "List issued operational certificates, newest first (query deviceId, namespace)",
     None, m.IssuedCertificateList, 200, [_DEVICE_ID_QUERY, _NAMESPACE_QUERY]),
    ("get", "/deviceCertificates/{serial}", "Show an issued certificate by serial number (hex) or SHA-256 thumbprint",
     None, m.IssuedCertificateResponse, 200, []),
    ("post", "/deviceCertificates/{serial}/revoke", "Revoke one certificate (409 if already revoked); live sessions "
     "holding it are dropped", m.RevokeBody, m.IssuedCertificateResponse, 200, []),
    ("post", "/deviceCertificates/revoke", "Revoke every unrevoked certificate of a device (by device or registration "
     "id); live sessions holding them are dropped", m.RevokeDeviceBody, m.IssuedCertificateList, 200, []),
    ("get", "/auditLog", "Audit log entries, newest first (query deviceId, namespace, action, since, until, top, "
     "before)", None, AuditEntryList, 200, [_DEVICE_ID_QUERY, _NAMESPACE_QUERY] + [
         {"name": n, "in": "query", "required": False, "schema": {"type": t}}
         for n, t in (("action", "string"), ("since", "string"), ("until", "string"), ("top", "integer"),
                      ("before", "integer"))]),
    ("get", "/auditLog/verify", "Check the audit log's hash chain: intact, or the first bad entry (query expectHead="
     "SEQ:HASH)", None, AuditVerification, 200,
     [{"name": "expectHead", "in": "query", "required": False, "schema": {"type": "string"}}]),
    # the service's own state (issue 19; docs/api.md "Service status", "Metrics")
    ("get", "/status", "One-screen summary: namespaces, policies, enrollments, devices provisioned and connected, "
     "certificates expiring, registrations and refusals of the last hour (query refusals: 0-100 recent ones)", None,
     None, 200, [_query("refusals", "integer")]),
    ("get", "/metrics", "Prometheus metrics (text format 0.0.4); a loopback client needs no credentials", None, None,
     200, []),
    # the fleet dashboard's pages and aggregates (issue 19; docs/api.md "Fleet dashboard")
    ("get", "/fleet/devices", "A page of a hub's devices by id: connected, last seen, current certificate (query hub, "
     "prefix, top, continuationToken)", None, None, 200, [_query(n, t) for n, t in (
         ("hub", "string"), ("prefix", "string"), ("top", "integer"), ("continuationToken", "string"))]),
    ("get", "/fleet/enrollments", "A page of enrollments or groups by id, without keys (query kind, top, "
     "continuationToken)", None, None, 200, [_query(n, t) for n, t in (
         ("kind", "string"), ("top", "integer"), ("continuationToken", "string"))]),
    ("get", "/fleet/expiryTimeline", "Unrevoked certificates expiring per UTC day, today first (query days, namespace)",
     None, None, 200, [_query("days", "integer"), _NAMESPACE_QUERY]),
    ("get", "/fleet/registrationsPerMinute", "Register operations per UTC minute by outcome (query minutes)", None,
     None, 200, [_query("minutes", "integer")]),
    ("get", "/crl/{ca}.crl", "A CA's CRL (DER, application/pkix-crl; no token; also on the plain-HTTP listener)",
     None, None, 200, []),
    ("post", "/ocsp", "OCSP (RFC 6960/5019): body application/ocsp-request, answer application/ocsp-response (no "
     "token; also on the plain-HTTP listener)", None, None, 200, []),
    ("get", "/ocsp/{request}", "OCSP by GET: the base64 DER request in the path (RFC 5019)", None, None, 200, []),
    ("get", "/accessPolicies", "List the shared access policies (without keys)", None, m.AccessPolicyList, 200, []),
    ("get", "/accessPolicies/{name}", "Show a shared access policy (without keys)", None, m.AccessPolicyResponse, 200,
     []),
    ("put", "/accessPolicies/{name}", "Create (201) or update (200) a shared access policy: rights, optional keys "
     "(If-None-Match: * creates only)", m.AccessPolicyBody, m.AccessPolicyResponse, 201, [_IF_NONE_MATCH]),
    ("delete", "/accessPolicies/{name}", "Delete a shared access policy (never provisioningserviceowner, never the "
     "last with ServiceConfig)", None, None, 204, []),
    ("get", "/accessPolicies/{name}/keys", "A shared access policy's keys", None, m.AccessPolicyKeys, 200, []),
    ("post", "/accessPolicies/{name}/keys/renew", "Renew the policy's primary or secondary key, or swap them",
     m.RenewKeyBody, m.AccessPolicyKeys, 200, []),
    ("put", "/namespaces/{ns}", "Create a namespace with its root CA and first policy", m.NamespaceBody,
     m.NamespaceResponse, 201, []),
    ("get", "/namespaces", "List namespaces", None, m.NamespaceList, 200, []),
    ("get", "/namespaces/{ns}", "Show a namespace", None, m.NamespaceResponse, 200, []),
    ("delete", "/namespaces/{ns}", "Delete a namespace and its PKI", None, None, 204, []),
    ("get", "/namespaces/{ns}/credentials/default", "Show the namespace credential (root CA)", None,
     m.CredentialResponse, 200, []),
    ("put", "/namespaces/{ns}/credentials/default/policies/{policy}", "Create or update a policy",
     m.PolicyBody, m.PolicyResponse, 201, [_IF_MATCH]),
    ("get", "/namespaces/{ns}/credentials/default/policies", "List policies", None, m.PolicyList, 200, []),
    ("get", "/namespaces/{ns}/credentials/default/policies/{policy}", "Show a policy", None, m.PolicyResponse,
     200, []),
    ("delete", "/namespaces/{ns}/credentials/default/policies/{policy}", "Delete a policy", None, None, 204,
     [_IF_MATCH]),
    ("get", "/namespaces/{ns}/credentials/default/policies/{policy}/issuingCas",
     "List the policy's issuing CAs, newest first (active, retired, revoked)", None, m.IssuingCaList, 200, []),
    ("post", "/namespaces/{ns}/credentials/default/policies/{policy}/issuingCas/{ca}/revoke",
     "Revoke a retired issuing CA (by serial number or SHA-256 thumbprint) and every certificate it signed; 409 for "
     "the active one (rotate first)", m.RevokeBody, m.IssuingCaRevocationResponse, 200, []),
    ("post", "/namespaces/{ns}/credentials/default/policies/{policy}/revokeCertificates",
     "Revoke every unrevoked certificate issued under the policy; live sessions holding them are dropped",
     m.RevokeBody, m.RevokedCount, 200, []),
    ("post", "/namespaces/{ns}/credentials/default/policies/{policy}/rotate",
     "New issuing CA for the policy; the old one is retired (hubs trust it until it expires); optional body "
     "{keyBackend}: where its key is made", m.RotateBody, m.PolicyResponse,
     200, [_IF_MATCH]),
    ("get", "/namespaces/{ns}/devices", "A page of the namespace's device registry (ADR) in device id order "
     "(top 1-1000, default 1000; continuationToken from the previous page)", None, None, 200, _KEYSET),
    ("get", "/namespaces/{ns}/devices/{deviceId}", "Show a device record (ADR)", None, None, 200, []),
    ("put", "/enrollments/{id}", "Create or replace an individual enrollment", None, None, 201, [_IF_MATCH]),
    ("get", "/enrollments/{id}", "Show an individual enrollment (without keys)", None, None, 200, []),
    ("delete", "/enrollments/{id}", "Delete an individual enrollment and its registration state", None, None, 204,
     [_IF_MATCH]),
    ("post", "/enrollments/{id}/attestationmechanism", "Attestation with keys", None, None, 200, []),
    ("post", "/enrollments/query", "List individual enrollments (x-ms-continuation paging)", None, None, 200, []),
    ("post", "/enrollments", "Bulk operation on up to 10 enrollments (mode create|update|updateIfMatchETag|delete)",
     None, None, 200, []),
    ("put", "/enrollmentGroups/{id}", "Create or replace an enrollment group", None, None, 201, [_IF_MATCH]),
    ("get", "/enrollmentGroups/{id}", "Show an enrollment group (without keys)", None, None, 200, []),
    ("delete", "/enrollmentGroups/{id}", "Delete an enrollment group", None, None, 204, [_IF_MATCH]),
    ("post", "/enrollmentGroups/{id}/attestationmechanism", "Attestation with keys", None, None, 200, []),
    ("post", "/enrollmentGroups/query", "List enrollment groups (x-ms-continuation paging)", None, None, 200, []),
    ("post", "/enrollmentGroups", "Bulk operation on up to 10 enrollment groups", None, None, 200, []),
    ("get", "/registrations/{id}", "Show a registration state", None, None, 200, []),
    ("delete", "/registrations/{id}", "Delete a registration state (the device registers as new)", None, None, 204,
     [_IF_MATCH]),
    ("post", "/registrations/{id}/query", "List registrations of an enrollment group", None, None, 200, []),
    ("put", "/linkedHubs/{name}", "Link a hub (properties.hostName, allocationWeight, applyAllocationPolicy)", None,
     None, 201, []),
    ("get", "/linkedHubs", "List linked hubs", None, None, 200, []),
    ("get", "/linkedHubs/{name}", "Show a linked hub", None, None, 200, []),
    ("delete", "/linkedHubs/{name}", "Unlink a hub (refused while an enrollment names it)", None, None, 204, [_IF_MATCH]),
    ("get", "/linkedHubs/{name}/devices", "A page of a hub's device identities with twins in device id order "
     "(top 1-1000, default 1000; continuationToken from the previous page)", None, None, 200, _KEYSET),
    ("get", "/linkedHubs/{name}/devices/{deviceId}", "Show a device identity and twin", None, None, 200, []),
    ("get", "/linkedHubs/{name}/certificates", "CAs the hub trusts: synced issuing CAs, then uploaded ones", None, None,
     200, []),
    ("put", "/linkedHubs/{name}/routes/{route}", "Route the hub's telemetry to NATS (properties.url, subject, durable, "
     "isEnabled; If-Match to replace)", None, None, 201, [_IF_MATCH]),
    ("get", "/linkedHubs/{name}/routes", "List the hub's telemetry routes", None, None, 200, []),
    ("get", "/linkedHubs/{name}/routes/{route}", "Show a telemetry route", None, None, 200, []),
    ("delete", "/linkedHubs/{name}/routes/{route}", "Delete a telemetry route", None, None, 204, [_IF_MATCH]),
    ("get", "/linkedHubs/{name}/keys", "The hub's own iothubowner keys", None, None, 200, []),
    ("post", "/linkedHubs/{name}/keys/renew", "Renew the hub's primary or secondary iothubowner key, or swap them",
     None, None, 200, []),
    ("put", "/linkedHubs/{name}/certificates/{cert}", "Upload a CA certificate to the hub (If-Match to replace)",
     m.CertificateBody, m.CertificateResponse, 201, [_IF_MATCH]),
    ("get", "/linkedHubs/{name}/certificates/{cert}", "Show a hub CA certificate", None, m.CertificateResponse, 200, []),
    ("delete", "/linkedHubs/{name}/certificates/{cert}", "Delete a hub CA certificate", None, None, 204, [_IF_MATCH]),
    ("post", "/linkedHubs/{name}/certificates/{cert}/generateVerificationCode", "Proof-of-possession code", None,
     m.CertificateResponse, 200, [_IF_MATCH_REQUIRED]),
    ("post", "/linkedHubs/{name}/certificates/{cert}/verify", "Verify possession of the hub CA's key",
     m.VerificationBody, m.CertificateResponse, 200, [_IF_MATCH_REQUIRED]),
    # the hub service API (iothubowner of the hub its audience names, or provisioningserviceowner with ?hub=)
    ("put", "/devices/{id}", "Create or update a device identity (authentication, status)", None, None, 200, [_IF_MATCH]),
    ("get", "/devices/{id}", "Show a device identity with its keys", None, None, 200, []),
    ("get", "/devices", "List device identities (device id order; top: at most that many, 1-1000, default 1000; "
     "x-ms-continuation in the answer when more follow, sent back for the next page)", None,
     None, 200, [_query("top", "integer"), _CONTINUATION]),
    ("post", "/devices/query", "Query twins: {\"query\": \"SELECT ... FROM devices [WHERE ...]\"} (x-ms-continuation paging)",
     None, None, 200, [_MAX_ITEM_COUNT, _CONTINUATION]),
    ("delete", "/devices/{id}", "Delete a device identity (a connected device is dropped)", None, None, 204, [_IF_MATCH]),
    ("get", "/twins/{id}", "Show a device twin", None, None, 200, []),
    ("patch", "/twins/{id}", "Merge-patch desired properties and tags (pushed to a connected device)", None, None, 200,
     [_IF_MATCH]),
    ("put", "/twins/{id}", "Replace tags and desired properties (the change is pushed to a connected device)", None,
     None, 200, [_IF_MATCH]),
    ("post", "/twins/{id}", "PATCH or PUT as POST with X-HTTP-Method-Override (Java's service SDK); else 405", None,
     None, 200, [_IF_MATCH]),
    ("post", "/twins/{id}/methods", "Invoke a direct method (methodName, payload, responseTimeoutInSeconds, "
     "connectTimeoutInSeconds)", None, None, 200, []),
    ("post", "/devices/{id}/messages/deviceBound", "Send a cloud-to-device message (iothub-* headers)", None, None, 202,
     []),
    ("delete", "/devices/{id}/commands", "Purge the device's cloud-to-device queue (totalMessagesPurged)", None, None,
     200, []),
    ("get", "/events", "Telemetry as NDJSON from a position (from, deviceId, timeout, count)", None, None, 200, []),
    # the DPS device API (attestation authenticates: the TLS client chain or a device SAS token)
    ("put", "/{idScope}/registrations/{registrationId}/register", "Register a device (DeviceRegistration, csr)", None,
     None, 202, []),
    ("get", "/{idScope}/registrations/{registrationId}/operations/{operationId}", "Poll a registration operation", None,
     None, 200, []),
    ("post", "/{idScope}/registrations/{registrationId}", "Registration status lookup", None, None, 200, []),
    ("get", "/$iothub/websocket", "MQTT over WebSockets (subprotocol mqtt): DPS and hub device sessions", None, None,
     101, []),
]
# paths a device calls: no service token (attestation, or the MQTT CONNECT, authenticates)
_DEVICE_PATHS = ("/{idScope}/", "/$iothub/")


def build_openapi() -> dict:
    models = {op[3] for op in OPERATIONS if op[3]} | {op[4] for op in OPERATIONS if op[4]} | {m.ErrorBody}
    _, defs = models_json_schema([(model, "validation") for model in sorted(models, key=lambda c: c.__name__)],
                                 ref_template="#/components/schemas/{model}")
    schemas = defs.get("$defs", {})
    ref = lambda model: {"$ref": f"#/components/schemas/{model.__name__}"}  # noqa: E731
    paths: dict = {}
    for method, path, summary, req, resp, status, params in OPERATIONS:
        path_params = [{"name": p.strip("{}"), "in": "path", "required": True, "schema": {"type": "string"}}
                       for p in path.split("/") if p.startswith("{")]
        op: dict = {"summary": summary, "parameters": path_params + params + [_API_VERSION],
                    "security": [] if path.startswith(_DEVICE_PATHS) else [{"sas": []}],
                    "responses": {str(status): {"description": "success"},
                                  "default": {"description": "error",
                                              "content": {"application/json": {"schema": ref(m.ErrorBody)}}}}}
        if resp is not None:
            op["responses"][str(status)]["content"] = {"application/json": {"schema": ref(resp)}}
        if req is not None:
            op["requestBody"] = {"required": method == "post" or path.startswith(("/certificates", "/accessPolicies")),
                                 "content": {"application/json": {"schema": ref(req)}}}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "opendps HTTPS API (DPS service, ADR, hub service, DPS device API)", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"sas": {
                "type": "apiKey", "in": "header", "name": "Authorization",
                "description": "SharedAccessSignature sr=<host>&sig=<HMAC>&se=<expiry>&skn=<access policy> (its rights "
                               "decide the routes: docs/api.md), or skn=iothubowner for a hub's service API"}},
        },
    }
