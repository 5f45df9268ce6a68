"""A software TPM 2.0 (swtpm) on loopback for the TPM tests.

:func:`running_swtpm` starts ``swtpm socket --tpm2`` with a fresh state directory on two consecutive free
loopback ports (the server port P and the control port P+1, which is where the ``swtpm`` TCTI looks for
it) and yields the TCTI string ``swtpm:host=127.0.0.1,port=P`` (for tpm2-tools' ``-T``/``TPM2TOOLS_TCTI``
and tpm2-pytss' ``TCTILdr``). The TPM is started (``startup-clear``): no ``tpm2_startup`` needed.

When swtpm or tpm2-tools are missing it skips through :func:`tests.conftest.service_missing` (a failure
where OPENDPS_REQUIRE_SERVICES=1, as in CI). The session-scoped ``swtpm`` fixture in tests/conftest.py
wraps it; tests sharing that TPM should flush what they load (``tpm2_flushcontext -t``): a TPM has
only three transient object slots.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TOOLS = ("swtpm", "tpm2_createprimary")


def tools_missing() -> str | None:
    """Why the software TPM cannot run here, or None."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install swtpm swtpm-tools tpm2-tools)"
    return None


@contextmanager
def running_swtpm(state_dir: Path | None = None) -> Iterator[str]:
    """:func:`opendps.device.swtpm.running_swtpm` for tests: skip (fail in CI) without the tools, fail the test
    when it does not start."""
    reason = tools_missing()
    if reason:
        from tests.conftest import service_missing

        service_missing(reason)
    import pytest

    from opendps.device.swtpm import SwtpmError
    from opendps.device.swtpm import running_swtpm as launch

    try:
        launcher = launch(state_dir)
        tcti = launcher.__enter__()
    except SwtpmError as exc:
        pytest.fail(str(exc))
    try:
        yield tcti
    finally:
        launcher.__exit__(None, None, None)


def tpm2(tcti: str, tool: str, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run one tpm2-tools command against ``tcti``; on failure fail the test with its stderr."""
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
    proc = subprocess.run([f"tpm2_{tool}", *args], cwd=cwd, env=env, capture_output=True, timeout=60)
    if check and proc.returncode != 0:
        import pytest

        pytest.fail(f"tpm2_{tool} {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return proc
