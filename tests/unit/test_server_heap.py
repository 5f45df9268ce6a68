"""``settle_heap``: what start-up made is out of the collector's generations, so collections while serving do not walk it
(run in a child process: freezing is process-wide)."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import gc
from opendps.server import settle_heap
kept = [[i] for i in range(10000)]  # start-up's objects: tracked by the collector
garbage = []
garbage.append(garbage)  # a cycle nobody holds: collected, not frozen
del garbage
before = gc.get_freeze_count()
settle_heap()
print(before, gc.get_freeze_count(), gc.get_count()[0], gc.garbage == [])
"""


def test_start_up_objects_are_frozen_after_one_full_collection():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True, timeout=60)
    before, frozen, young, clean = out.stdout.split()
    assert int(before) == 0 and int(frozen) >= 10000 and int(young) < 100 and clean == "True"
