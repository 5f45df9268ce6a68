"""Shared access policies in-process (issue 12.18): names, rights, keys, the owner and ServiceConfig rules, renewal,
and how soon the token check's cache sees a change — in this process and in another one sharing the database."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from opendps.errors import Conflict, InvalidInput, NotFound
from opendps.provisioning.access import (
    HUB_OWNER_POLICY,
    OWNER_POLICY,
    OWNER_RIGHTS,
    RIGHTS,
    AccessPolicies,
    effective_rights,
)
from opendps.store import AccessPolicy


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def policies(services) -> AccessPolicies:
    """The installation's policies with the owner policy init makes."""
    services.access_policies.ensure(OWNER_POLICY, OWNER_RIGHTS)
    return services.access_policies


def _key(n: int = 32) -> str:
    return base64.b64encode(bytes([n]) * n).decode()


def test_the_owner_s_stored_rights_still_mean_everything():
    assert effective_rights(r.strip() for r in OWNER_RIGHTS.split(",")) == frozenset(RIGHTS)
    assert effective_rights(["EnrollmentWrite"]) == {"EnrollmentWrite", "EnrollmentRead", "RegistrationStatusRead",
                                                     "RegistrationStatusWrite"}
    assert effective_rights(["EnrollmentRead"]) == {"EnrollmentRead", "RegistrationStatusRead"}
    assert effective_rights(["RegistrationStatusWrite"]) == {"RegistrationStatusWrite", "RegistrationStatusRead"}
    assert effective_rights(["ServiceConfig"]) == {"ServiceConfig"}  # configuring is not reading enrollments
    assert effective_rights(["RegistryWrite"]) == frozenset()  # a hub right grants nothing here


def test_create_generates_256_bit_keys_and_never_shows_them(policies):
    view, created = policies.put("reader", "enrollmentread,  RegistrationStatusRead EnrollmentRead")
    assert created and view.name == "reader"
    assert view.rights == ("EnrollmentRead", "RegistrationStatusRead")  # known, deduplicated, Azure's order
    assert view.rights_text == "EnrollmentRead, RegistrationStatusRead"
    assert not any("key" in f for f in view.__dataclass_fields__)
    primary, secondary = policies.keys_of("reader")
    assert len(base64.b64decode(primary)) == 32 and len(base64.b64decode(secondary)) == 32 and primary != secondary
    assert [v.name for v in policies.list()] == [OWNER_POLICY, "reader"]
    assert repr(policies.credentials("reader")).count(primary) == 0  # keys stay out of repr (and so of logs)


def test_keys_are_wrapped_under_the_labels_every_installation_used(policies, store, keys):
    policies.put("given", ["ServiceConfig"], primary_key=_key(16), secondary_key=_key(64))
    with store.session() as s:
        row = s.get(AccessPolicy, "given")
        assert keys.unwrap(row.primary_key, "access-policy:given:primary").decode() == _key(16)
        assert keys.unwrap(row.secondary_key, "access-policy:given:secondary").decode() == _key(64)
        assert _key(16).encode() not in row.primary_key
    # a row written as older versions wrote it is read as is
    with store.session() as s:
        s.add(AccessPolicy(name="older", rights="EnrollmentRead", created_at=datetime.now(UTC),
                           primary_key=keys.wrap(_key(20).encode(), "access-policy:older:primary"),
                           secondary_key=keys.wrap(_key(21).encode(), "access-policy:older:secondary")))
    assert policies.keys_of("older") == (_key(20), _key(21))
    assert policies.credentials("older").rights == {"EnrollmentRead", "RegistrationStatusRead"}


@pytest.mark.parametrize(("name", "rights", "extra", "words"), [
    ("bad name", "ServiceConfig", {}, "is invalid"),
    ("x" * 65, "ServiceConfig", {}, "is invalid"),
    ("", "ServiceConfig", {}, "is invalid"),
    ("IoTHubOwner", "ServiceConfig", {}, "reserved for linked hubs"),
    ("p", "ServiceConfig, RegistryWrite", {}, "unknown right 'RegistryWrite'"),
    ("p", " , ", {}, "at least one right"),
    ("p", 7, {}, "rights must be"),
    ("p", ["ServiceConfig", 3], {}, "rights must be"),
    ("p", "ServiceConfig", {"primary_key": "not base64!"}, "primaryKey is not valid base64"),
    ("p", "ServiceConfig", {"secondary_key": _key(8)}, "secondaryKey must decode to 16-64 bytes"),
])
def test_bad_input_is_refused_before_anything_is_written(policies, name, rights, extra, words):
    with pytest.raises(InvalidInput, match=words):
        policies.put(name, rights, **extra)
    assert [v.name for v in policies.list()] == [OWNER_POLICY]


def test_names_are_unique_ignoring_case_and_create_only_or_update_only(policies):
    policies.put("Ops.team_1-a", "ServiceConfig")
    with pytest.raises(Conflict, match="'Ops.team_1-a' already exists"):
        policies.put("ops.TEAM_1-a", "ServiceConfig")
    with pytest.raises(Conflict, match="already exists"):
        policies.put("Ops.team_1-a", "ServiceConfig", exists=False)
    with pytest.raises(NotFound, match="no access policy named 'ghost'"):
        policies.put("ghost", "ServiceConfig", exists=True)
    view, created = policies.put("Ops.team_1-a", "EnrollmentWrite DeviceConnect", exists=True)
    assert not created and view.rights == ("EnrollmentWrite", "DeviceConnect")


def test_update_keeps_keys_unless_given(policies):
    policies.put("k", "ServiceConfig")
    before = policies.keys_of("k")
    policies.put("k", "EnrollmentRead")
    assert policies.keys_of("k") == before
    policies.put("k", "EnrollmentRead", secondary_key=_key(48))
    assert policies.keys_of("k") == (before[0], _key(48))


def test_the_owner_cannot_be_deleted_and_one_policy_keeps_service_config(policies):
    with pytest.raises(Conflict, match="cannot be deleted") as info:
        policies.delete(OWNER_POLICY)
    assert info.value.status == 409
    with pytest.raises(Conflict, match="only one with ServiceConfig"):
        policies.put(OWNER_POLICY, "EnrollmentWrite")  # nobody could configure the service
    policies.put("admin", "ServiceConfig")
    policies.put(OWNER_POLICY, "EnrollmentWrite DeviceConnect")  # allowed: admin configures
    with pytest.raises(Conflict, match="'admin' is the only one with ServiceConfig"):
        policies.delete("admin")
    with pytest.raises(Conflict, match="'admin' is the only one with ServiceConfig"):
        policies.put("admin", "EnrollmentRead")
    policies.put(OWNER_POLICY, OWNER_RIGHTS)
    policies.delete("admin")
    assert [v.name for v in policies.list()] == [OWNER_POLICY]
    with pytest.raises(NotFound):
        policies.delete("admin")


def test_renew_primary_secondary_and_swap(policies):
    policies.put("r", "ServiceConfig")
    primary, secondary = policies.keys_of("r")
    p2, s2 = policies.renew_key("r", "primary")
    assert s2 == secondary and p2 not in (primary, secondary)
    p3, s3 = policies.renew_key("r", "secondary")
    assert p3 == p2 and s3 not in (secondary, s2)
    assert policies.renew_key("r", "swap") == (s3, p3) == policies.keys_of("r")
    with pytest.raises(InvalidInput, match="renewKey must be primary, secondary or swap"):
        policies.renew_key("r", "tertiary")
    with pytest.raises(NotFound):
        policies.renew_key("ghost", "primary")


def test_iothubowner_is_no_dps_policy_but_an_older_installation_s_pair_is_readable(policies):
    assert policies.former_hub_owner_keys() is None
    policies.ensure(HUB_OWNER_POLICY, "RegistryWrite, ServiceConnect, DeviceConnect")  # what older versions made
    former = policies.former_hub_owner_keys()
    assert former is not None
    assert [v.name for v in policies.list()] == [OWNER_POLICY]
    for call in (policies.get, policies.keys_of, policies.delete):
        with pytest.raises(NotFound):
            call(HUB_OWNER_POLICY)
    assert policies.credentials(HUB_OWNER_POLICY) is None


def test_a_change_here_is_seen_at_once_and_in_another_process_within_the_cache_time(services, store, keys):
    clock = Clock()
    here = services.access_policies
    here.ensure(OWNER_POLICY, OWNER_RIGHTS)
    there = AccessPolicies(store, keys, ttl=5.0, clock=clock)  # another server process on the same database
    assert there.credentials("late") is None  # a miss is cached too
    here.put("late", "EnrollmentRead")
    assert here.credentials("late").rights == {"EnrollmentRead", "RegistrationStatusRead"}
    assert there.credentials("late") is None
    clock.now += 5.1
    old = there.credentials("late")
    assert old is not None and old.primary_key == here.keys_of("late")[0]

    new_primary, _ = here.renew_key("late", "primary")
    assert here.credentials("late").primary_key == new_primary  # this process: at once
    assert there.credentials("late").primary_key == old.primary_key  # the other: until its entry is 5 s old
    clock.now += 4.9
    assert there.credentials("late").primary_key == old.primary_key
    clock.now += 0.2
    assert there.credentials("late").primary_key == new_primary

    here.delete("late")
    assert here.credentials("late") is None
    assert there.credentials("late") is not None
    clock.now += 5.1
    assert there.credentials("late") is None


def test_names_no_policy_can_have_never_reach_the_database(policies):
    for name in ("x" * 65, "bad name", "", HUB_OWNER_POLICY):
        assert policies.cached_credentials(name) == (True, None)
    assert policies.cached_credentials("reader") == (False, None)
