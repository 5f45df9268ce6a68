"""How the listeners share the process's descriptors (transport.tls.connection_budgets)."""

from __future__ import annotations

import resource

import pytest

from opendps.transport.tls import connection_budgets


@pytest.fixture
def soft_limit():
    """Lower the soft descriptor limit for one test (restored after)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)

    def lower(soft: int) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))

    yield lower
    resource.setrlimit(resource.RLIMIT_NOFILE, old)


def test_the_mqtt_listener_gets_the_largest_share(soft_limit):
    soft_limit(20_000)
    budgets = connection_budgets(["HTTPS", "MQTT", "HTTP"])
    # 19,872 descriptors after the reserve, by weight 4 : 8 : 1 (an equal split gave each 6,624)
    assert budgets == {"HTTPS": 6114, "MQTT": 12228, "HTTP": 1528}
    assert sum(budgets.values()) <= 20_000 - 128


def test_every_listener_serves_all_together_below_the_limit(soft_limit):
    soft_limit(1024)
    budgets = connection_budgets(["HTTPS", "MQTT", "AMQP", "HTTP", "metrics"])
    assert set(budgets) == {"HTTPS", "MQTT", "AMQP", "HTTP", "metrics"}
    assert sum(budgets.values()) <= 1024 - 128
    assert budgets["MQTT"] == 2 * budgets["HTTPS"] == 4 * budgets["AMQP"] == 448


def test_a_tiny_limit_still_admits_one_connection_each(soft_limit):
    soft_limit(130)
    assert connection_budgets(["HTTPS", "MQTT"], reserve=128) == {"HTTPS": 1, "MQTT": 1}
    assert connection_budgets(["HTTPS", "MQTT"], reserve=512) == {"HTTPS": 1, "MQTT": 1}


def test_an_unknown_listener_name_is_a_programming_error():
    with pytest.raises(KeyError):
        connection_budgets(["SMTP"])
