"""The certificate-status routes are open to anyone: a flood of OCSP requests (each a signature) gets a bounded share
of the domain thread pool and then tryLater, never the whole pool."""

from __future__ import annotations

import asyncio

from opendps.frontends.http.pki_status import StatusGate


def test_at_most_slots_run_at_once_and_beyond_the_waiting_room_requests_are_turned_away():
    async def scenario() -> tuple[list[str | None], int]:
        gate = StatusGate(slots=2, waiting=3)
        release = asyncio.Event()
        running = 0
        peak = 0

        async def sign(n: int) -> str:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await release.wait()
            running -= 1
            return f"answer {n}"

        tasks = [asyncio.create_task(gate.admit(lambda n=n: sign(n))) for n in range(5)]
        await asyncio.sleep(0.01)
        late = await gate.admit(lambda: sign(99))  # 2 running + 3 waiting: no room for a sixth
        release.set()
        answers = [await t for t in tasks]
        assert gate.admitted == 0
        assert await gate.admit(lambda: sign(7)) == "answer 7"  # room again once the flood has passed
        return [*answers, late], peak

    answers, peak = asyncio.run(scenario())
    assert answers == ["answer 0", "answer 1", "answer 2", "answer 3", "answer 4", None]
    assert peak == 2
