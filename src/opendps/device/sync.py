"""Blocking wrappers for device code that is not asyncio (scripts, threads, simple firmware loops).

:func:`provision` runs one registration in a private event loop. :class:`SyncHubClient` runs an
:class:`~opendps.device.hub.HubClient` on an event loop in a background thread; its synchronous
callbacks run in worker threads (``asyncio.to_thread``), so they may call the client's blocking
methods themselves without deadlocking the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from cryptography import x509

from opendps.device.hub import C2dMessage, HubClient
from opendps.device.provisioning import ProvisioningClient, RegistrationResult

__all__ = ["SyncHubClient", "provision"]

T = TypeVar("T")


def provision(host: str, id_scope: str, registration_id: str, *, csr_b64: str | None = None, payload: Any = None,
              **options: Any) -> RegistrationResult:
    """Register with DPS and block until assigned; ``options`` are :class:`ProvisioningClient`'s keywords."""

    async def run() -> RegistrationResult:
        return await ProvisioningClient(host, id_scope, registration_id, **options).register(csr_b64, payload)

    return asyncio.run(run())


class SyncHubClient:
    """:class:`HubClient` with blocking methods; ``close()`` (or ``with``) stops its thread."""

    def __init__(self, hub_host: str, device_id: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"hub-client:{device_id}", daemon=True)
        self._thread.start()
        self.timeout: float = float(options.get("timeout", 30.0)) + 5.0

        async def make() -> HubClient:
            return HubClient(hub_host, device_id, **options)

        self.client: HubClient = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout or self.timeout)

    @staticmethod
    def _threaded(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def call(*args: Any) -> Any:
            return await asyncio.to_thread(fn, *args)

        return call

    def connect(self) -> None:
        self._run(self.client.connect())

    def send_telemetry(self, body: bytes | str | dict | list, properties: dict[str, Any] | None = None,
                       content_type: str | None = None, message_id: str | None = None, **kwargs: Any) -> None:
        self._run(self.client.send_telemetry(body, properties, content_type, message_id, **kwargs))

    def get_twin(self) -> dict:
        return self._run(self.client.get_twin())

    def patch_reported(self, patch: dict) -> int:
        return self._run(self.client.patch_reported(patch))

    def renew_certificate(self, csr_b64: str) -> list[x509.Certificate]:
        return self._run(self.client.renew_certificate(csr_b64), timeout=self.client.renewal_timeout + 5)

    def switch_credentials(self, **credentials: Any) -> None:
        self._run(self.client.switch_credentials(**credentials))

    def on_desired(self, callback: Callable[[dict], None]) -> None:
        self._loop.call_soon_threadsafe(self.client.on_desired, self._threaded(callback))

    def on_method(self, name: str | None, handler: Callable[[str, Any], tuple[int, Any]]) -> None:
        self._loop.call_soon_threadsafe(self.client.on_method, name, self._threaded(handler))

    def on_c2d(self, callback: Callable[[C2dMessage], None]) -> None:
        self._loop.call_soon_threadsafe(self.client.on_c2d, self._threaded(callback))

    def close(self) -> None:
        """Disconnect and stop the loop thread."""
        if not self._thread.is_alive():
            return
        try:
            self._run(self.client.disconnect())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> SyncHubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
