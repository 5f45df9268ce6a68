"""Hub allocation: hashed (weighted rendezvous hashing), static, and custom (a webhook).

Rendezvous hashing is deterministic per registration id, spreads evenly by weight, and moves only
the devices of a hub that is added or removed.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
from dataclasses import dataclass
from typing import Any

import httpx

from opendps.errors import InvalidInput, OpenDPSError, ServiceUnavailable
from opendps.hub import HubView, initial_twin
from opendps.transport.wire import parse_json

DEFAULT_WEBHOOK_TIMEOUT = 10.0
MAX_WEBHOOK_RESPONSE = 64 * 1024
# webhook calls one process makes at once: half the domain runner's 8 threads (frontends.runtime.DomainRunner), so a
# webhook slow to answer (up to its 60 s timeout) cannot hold every thread while hub CONNECTs and the service API wait
WEBHOOK_CALLS_AT_ONCE = 4
# how long a registration waits for one of those slots: a burst against a webhook that answers in milliseconds takes
# turns (each wait holds a domain thread, briefly); only when the slots stay taken (a slow webhook) is it refused
WEBHOOK_SLOT_WAIT = 1.0
WEBHOOK_BUSY_RETRY_AFTER = 5  # seconds a registration refused for want of a webhook slot is told to wait
_webhook_slots = threading.BoundedSemaphore(WEBHOOK_CALLS_AT_ONCE)


class AllocationFailed(InvalidInput):
    """No hub could be chosen. Not sent as an HTTP error: the registration ends as a *failed operation*
    carrying this code and message, which the device reads when it polls."""

    error_code = 400208


class WebhookBusy(ServiceUnavailable):
    """This process has waited on :data:`WEBHOOK_CALLS_AT_ONCE` custom-allocation webhook answers for
    :data:`WEBHOOK_SLOT_WAIT`: the registration is refused as retryable (503 with Retry-After, DPS MQTT ``res/503``)
    before anything is sent or written, rather than hold one more domain thread for as long as the webhook takes."""

    def __init__(self) -> None:
        super().__init__(f"custom allocation webhooks are slow to answer: this server already waits on "
                         f"{WEBHOOK_CALLS_AT_ONCE} of their answers; retry later",
                         info={"retryAfter": str(WEBHOOK_BUSY_RETRY_AFTER)}, reason="webhook_busy")


@dataclass(frozen=True)
class Allocation:
    hub: HubView
    initial_twin: dict[str, Any] | None = None  # the webhook may replace the enrollment's initial twin
    payload: Any = None  # returned to the device in registrationState.payload


def candidates(document: dict[str, Any], hubs: list[HubView]) -> list[HubView]:
    """The enrollment's hubs, or every hub that applies allocation policy when it lists none."""
    listed = document.get("iotHubs") or []
    if listed:
        by_host = {h.host_name: h for h in hubs}
        return [by_host[h] for h in listed if h in by_host]
    return [h for h in hubs if h.apply_allocation_policy and h.allocation_weight > 0]


def hashed(registration_id: str, hubs: list[HubView]) -> HubView:
    """Weighted rendezvous hashing over the registration id (case-insensitive, like the id)."""
    def score(h: HubView) -> float:
        digest = hashlib.sha256(f"{registration_id.lower()}\0{h.host_name}".encode()).digest()
        u = (int.from_bytes(digest[:8], "big") + 1) / (2**64 + 1)  # (0, 1)
        return -max(h.allocation_weight, 1) / math.log(u)
    return max(hubs, key=score)


def custom(url: str, request_body: dict[str, Any], hubs: list[HubView], *, timeout: float, verify: Any = True) -> Allocation:
    """POST Azure's AllocationRequest to the webhook; validate its answer.

    The whole exchange — connecting, the status line and headers, the body — is given up once ``timeout`` has
    passed since the request began, and the body is read as it arrives, at most :data:`MAX_WEBHOOK_RESPONSE`
    bytes: a webhook that sends without end, or a byte at a time (headers included), holds a domain thread about
    ``timeout`` and no more memory than the bound. Why on a loop of its own (this runs in a domain thread): httpx's
    timeouts bound each read, not the whole, and only a cancelled coroutine stops a read that keeps getting bytes.
    At most :data:`WEBHOOK_CALLS_AT_ONCE` calls at once per process; a call that finds no slot free within
    :data:`WEBHOOK_SLOT_WAIT` is :class:`WebhookBusy`."""
    if not _webhook_slots.acquire(timeout=WEBHOOK_SLOT_WAIT):
        raise WebhookBusy()
    try:
        body = asyncio.run(_answer(url, request_body, timeout, verify))
    except TimeoutError as exc:
        raise AllocationFailed(f"custom allocation webhook did not answer within {timeout:g} s") from exc
    except httpx.TimeoutException as exc:
        raise AllocationFailed(f"custom allocation webhook did not answer within {timeout:g} s") from exc
    except httpx.HTTPError as exc:
        raise AllocationFailed(f"custom allocation webhook could not be reached: {exc}") from exc
    finally:
        _webhook_slots.release()
    try:
        answer = parse_json(body, "custom allocation webhook's answer")
    except InvalidInput as exc:
        raise AllocationFailed(exc.message) from exc
    if not isinstance(answer, dict):
        raise AllocationFailed("custom allocation webhook returned JSON that is not an object")
    host = answer.get("iotHubHostName")
    if not isinstance(host, str) or not host:
        raise AllocationFailed("custom allocation webhook response lacks iotHubHostName")
    hub = next((h for h in hubs if h.host_name == host.lower()), None)
    if hub is None:
        raise AllocationFailed(f"custom allocation webhook chose {host!r}, which is not one of the enrollment's linked hubs")
    twin = answer.get("initialTwin")
    if twin is not None:  # held to the hub's twin rules, as an enrollment's initial twin is
        try:
            twin = initial_twin(twin, "custom allocation webhook's initialTwin")
        except OpenDPSError as exc:  # InvalidInput, PayloadTooLarge
            raise AllocationFailed(exc.message) from exc
    return Allocation(hub, twin, answer.get("payload"))


async def _answer(url: str, request_body: dict[str, Any], timeout: float, verify: Any) -> bytes:
    """The webhook's 2xx body, within ``timeout`` from start to end (:func:`custom`)."""
    async with asyncio.timeout(timeout), \
            httpx.AsyncClient(timeout=timeout, verify=verify, follow_redirects=False) as client, \
            client.stream("POST", url, json=request_body, headers={"Accept-Encoding": "identity"}) as resp:
        if not 200 <= resp.status_code < 300:
            raise AllocationFailed(f"custom allocation webhook returned HTTP {resp.status_code}")
        body = bytearray()
        async for chunk in resp.aiter_bytes():  # decoded, should a webhook compress anyway
            body += chunk
            if len(body) > MAX_WEBHOOK_RESPONSE:
                raise AllocationFailed(f"custom allocation webhook response is larger than {MAX_WEBHOOK_RESPONSE} bytes")
        return bytes(body)
