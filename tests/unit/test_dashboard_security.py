"""What the dashboard's API answers tell caches and browsers (issue 19): an answer to a request that showed a
credential is stored by no cache (``Cache-Control: no-store``), and no answer is sniffed as markup (``nosniff``).
The page's own headers (CSP, frame-ancestors) are checked in tests/unit/test_fleet.py; the page in a browser in
tests/test_dashboard.py."""

from __future__ import annotations

from tests.unit.test_fleet import _get

from opendps.provisioning.access import OWNER_POLICY, OWNER_RIGHTS
from opendps.transport import sas


def test_authorized_answers_are_not_cached_and_no_answer_is_sniffed(services):
    services.access_policies.ensure(OWNER_POLICY, OWNER_RIGHTS)
    token = sas.generate("localhost", services.access_policies.keys_of(OWNER_POLICY)[0], OWNER_POLICY)
    answers = _get(services, ["/fleet/devices", "/namespaces", "/twins/nobody?hub=default", "/auditLog?top=1"], token)
    assert [status for status, _, _ in answers] == [200, 200, 404, 200], answers
    for status, headers, _ in answers:  # errors too: a 404 names what the caller asked for
        assert headers.get("Cache-Control") == "no-store", (status, headers)
        assert headers.get("X-Content-Type-Options") == "nosniff", (status, headers)
    (refused, refused_headers, _), (page, page_headers, _), (health, health_headers, _) = _get(
        services, ["/fleet/devices", "/ui/", "/healthz"], None)
    assert (refused, page, health) == (401, 200, 200)
    assert refused_headers.get("X-Content-Type-Options") == "nosniff"
    assert page_headers["Cache-Control"] == "no-cache"  # the page's own (revalidated by ETag): kept
    assert "no-store" not in health_headers.get("Cache-Control", "")  # nothing private shown, nothing asked
