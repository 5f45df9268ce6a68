"""``limit_malloc_arenas``: the server's threads share two glibc malloc arenas (see its docstring for why)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc arenas only")

# six threads that each allocate: glibc gives every new thread that allocates an arena of its own, up to its limit;
# malloc_stats() prints one "Arena N:" block per arena on stderr
_SCRIPT = """
import ctypes, sys, threading
from opendps.server import limit_malloc_arenas
limited = limit_malloc_arenas() if sys.argv[1] == "limit" else None
print(limited, flush=True)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
start = threading.Barrier(6)
def work():
    start.wait()
    kept = [libc.malloc(256) for _ in range(100)]
    start.wait()  # all six hold their blocks at once
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()
"""


def _arenas(mode: str, **env: str) -> tuple[str, int]:
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    done = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, env=environment,
                          timeout=60, check=True)
    return done.stdout.strip(), sum(line.startswith("Arena ") for line in done.stderr.splitlines())


def test_server_threads_share_two_arenas() -> None:
    limited, arenas = _arenas("limit")
    assert limited == "True"
    assert 1 <= arenas <= 2


def test_without_the_limit_each_thread_takes_its_own_arena() -> None:
    """The control: the script can tell a limited process from one that is not."""
    assert _arenas("none")[1] > 2


def test_an_operators_malloc_arena_max_wins() -> None:
    limited, arenas = _arenas("limit", MALLOC_ARENA_MAX="4")
    assert limited == "False"
    assert 2 < arenas <= 4
