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


class _Conn:
    def __init__(self, name: str, closed: list[str]) -> None:
        self.name, self.closed = name, closed

    def evict(self) -> None:
        self.closed.append(self.name)


def test_with_an_idle_check_a_full_listener_closes_its_oldest_idle_answered_connection(caplog):
    """HTTPS: one peer completing handshakes and sending one request each held the listener full for the keep-alive
    timeout, as answered connections were never closed to make room. With ``idle`` the oldest answered connection
    that waits for nothing goes (busy ones are asked and kept, moved to the back); the scan per admission is
    bounded; released and never-answered connections are not asked; without ``idle`` nothing changes."""
    from opendps.transport.tls import ConnectionGate

    closed: list[str] = []
    busy: set[str] = set()
    asked: list[str] = []

    def idle(conn: _Conn) -> bool:
        asked.append(conn.name)
        return conn.name not in busy

    gate = ConnectionGate("HTTPS", 3, idle=idle)
    a, b, c = (_Conn(n, closed) for n in "abc")
    for conn in (a, b, c):
        assert gate.admit(conn)
        gate.answered(conn)
    gate.answered(a)  # a keep-alive connection answered again keeps its place
    busy.add("a")  # a request in progress (a long poll, a body arriving)
    assert gate.admit(_Conn("d", closed)) and closed == ["b"] and asked == ["a", "b"]
    assert gate.admit(e := _Conn("e", closed)) and closed == ["b", "d"]  # d not yet answered: it goes first
    gate.answered(e)
    busy.update("ce")
    asked.clear()
    assert not gate.admit(_Conn("f", closed)) and closed == ["b", "d"]  # every one busy: refused
    assert sorted(asked) == ["a", "c", "e"] and gate.active == 3
    gate.release(c)  # gone: never asked again
    assert gate.admit(g := _Conn("g", closed))
    gate.answered(g)
    busy.clear()
    asked.clear()
    assert gate.admit(_Conn("h", closed)) and closed == ["b", "d", "a"] and asked == ["a"]
    assert "closed 1 that had not been answered or were idle to make room and refused 0 new ones" in caplog.text

    many = ConnectionGate("HTTPS", 100, idle=idle)
    conns = [_Conn(f"x{i}", closed) for i in range(100)]
    for conn in conns:
        assert many.admit(conn)
        many.answered(conn)
    busy.update(conn.name for conn in conns)
    asked.clear()
    assert not many.admit(_Conn("y", closed))
    assert len(asked) == ConnectionGate.IDLE_SCAN  # bounded, and the next admission asks the next ones
    asked.clear()
    assert not many.admit(_Conn("z", closed))
    assert asked == [f"x{i}" for i in range(ConnectionGate.IDLE_SCAN, 2 * ConnectionGate.IDLE_SCAN)]

    plain = ConnectionGate("MQTT", 1)  # no idle check: answered connections are never closed to make room
    assert plain.admit(m := _Conn("m", closed))
    plain.answered(m)
    assert not plain.admit(_Conn("n", closed)) and "m" not in closed


def test_a_full_listener_closes_its_oldest_unanswered_connection_to_make_room(caplog):
    """Refusing the newest let one peer hold a listener full with connections that never send a byte (each replaced
    as its handshake deadline closed it); now the oldest connection nothing was written to goes, and a connection
    that was answered (a device past its CONNACK) is never closed to make room."""
    from opendps.transport.tls import ConnectionGate

    closed: list[str] = []
    gate = ConnectionGate("MQTT", 3)
    a, b, c, d, e, f = (_Conn(n, closed) for n in "abcdef")
    assert gate.admit(a) and gate.admit(b) and gate.admit(c) and gate.active == 3
    gate.answered(a)  # a device that got its CONNACK
    assert gate.admit(d) and closed == ["b"]  # the oldest unanswered, not a
    assert gate.admit(e) and closed == ["b", "c"]
    gate.answered(d)
    gate.answered(e)
    assert not gate.admit(f) and closed == ["b", "c"]  # all answered: the new one is refused
    assert gate.active == 3 and gate.evicted == 1 and gate.refused == 1  # counted since the one report a minute:
    assert caplog.text.count("MQTT listener is at its limit of 3") == 1  # at the first eviction
    assert "closed 1 that had not been answered or were idle to make room and refused 0 new ones" in caplog.text
    gate.release(a)
    assert gate.admit(f) and gate.active == 3 and closed == ["b", "c"]
    gate.release(f)  # released before it was answered: no longer a candidate
    assert gate.admit(_Conn("g", closed)) and gate.active == 3
    assert gate.admit(_Conn("h", closed)) and closed == ["b", "c", "g"]
    assert not gate.admit()  # a connection that cannot be closed to make room is only admitted below the cap
